"""The one line nginx writes per request, and what keter reads from it.

This is the contract between the nginx renderer (which writes the
``log_format`` and ``access_log`` lines, ``log_format_directive`` and
``access_log_directive``) and the stats component (which parses the lines,
``parse``). Every server block nginx serves for an app logs to one spool file
of keter's, ``ROOT/run/access.spool``, through a ``log_format`` of that app,
whose app name and version are literal text: nginx spends nothing per request
beyond formatting the line into its buffer.

One record, fields separated by tabs (nginx escapes a tab, a quote, a
backslash and every byte below 32 or above 126 inside a value as ``\\xHH``,
so a record is always one line)::

    k2 APP VERSION $msec $status $body_bytes_sent $request_time
    $upstream_response_time $upstream_addr $remote_addr $remote_user $time_local
    $host $request $http_referer $http_user_agent

``$upstream_addr`` tells an answer of the app's from one nginx gave itself
with an upstream time all the same: when the app's ``max_conns`` are all
taken, nginx answers 502 at once ("no live upstreams"), logs ``0.000`` and
names the upstream block instead of an address. Such a record has no upstream
time here: it says nothing of the version (any client that holds the app's
connections can make them). Lines of the format before (``k1``, without the
address) are still read: a keter upgraded with records left in the spool.

``access_line`` turns a record into the line of ``ROOT/log/access-APP.log``:
the combined log format followed by the host, the request time, the upstream
response time (seconds; ``-`` when nginx answered itself) and the version::

    127.0.0.1 - - [30/Nov/2026:03:40:25 +0000] "GET / HTTP/1.1" 200 3 "-" "curl/7.88"
        a.test 0.004 0.004 9b1c07d2e4aa

(one line; broken here to fit).
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass

from keter.names import nginx_name_part, nginx_quote, validate_app_name

TAG = b"k2"  # the format's version: a spool line of another format is skipped
_FIELDS = 16
_OLD_TAG, _OLD_FIELDS = b"k1", 15  # the format before, without $upstream_addr
_VERSION = re.compile(r"[0-9a-f]{1,64}|-")
_SEPARATORS = re.compile(rb"[,:]")
_VARIABLES = (
    "$msec",
    "$status",
    "$body_bytes_sent",
    "$request_time",
    "$upstream_response_time",
    "$upstream_addr",
    "$remote_addr",
    "$remote_user",
    "$time_local",
    "$host",
    "$request",
    "$http_referer",
    "$http_user_agent",
)


def log_format_name(app: str) -> str:
    """The nginx name of an app's log format. nginx defines formats by their exact name
    but finds an access_log's ignoring case: "Foo" and "foo" kept their case, and foo's
    requests were logged and counted as Foo's (its watch rolled Foo back)."""
    return f"keter_log_{nginx_name_part(validate_app_name(app))}"


def log_format_directive(app: str, version: str) -> str:
    """The http-level ``log_format`` for one app serving ``version`` (a short sha256)."""
    version = version if _VERSION.fullmatch(version or "") else "-"  # e.g. "unknown"
    fields = [TAG.decode(), validate_app_name(app), version, *_VARIABLES]
    text = "\\t".join(fields)  # nginx turns \t into a tab
    return f"log_format {log_format_name(app)} '{text}';"


def access_log_directive(spool: str, app: str) -> str:
    """The server-level ``access_log`` that sends an app's requests to keter's spool.

    Buffered: nginx writes the spool every 64 KiB or every second, whichever
    comes first, so a request costs it no system call.
    """
    # A $ would make the path a variable: nginx would open the file at every write,
    # and buffer= is refused with one (keter refuses a ROOT with a $ at start).
    if not spool.startswith("/") or "$" in spool:
        raise ValueError(f"invalid access spool path {spool!r}")
    return f"access_log {nginx_quote(spool)} {log_format_name(app)} buffer=64k flush=1s;"


@dataclass(slots=True)
class Record:
    """One request, as keter keeps it: enough for the statistics and the access log."""

    app: str
    version: str
    at: float  # seconds since the epoch, when nginx finished the request
    status: int
    bytes_sent: int
    request_time: float
    upstream_time: float | None  # None when nginx answered without the app
    line: bytes  # the access log line, without its newline


def parse(raw: bytes) -> Record | None:
    """A spool line (without its newline) as a Record; None if it is not one of keter's."""
    fields = raw.split(b"\t")
    if len(fields) == _OLD_FIELDS and fields[0] == _OLD_TAG:
        fields.insert(8, b"")  # no address: the upstream time alone tells
    elif len(fields) != _FIELDS or fields[0] != TAG:
        return None
    (
        _,
        app,
        version,
        msec,
        status,
        sent,
        request_time,
        upstream,
        upstream_addr,
        addr,
        user,
        time_local,
        host,
        request,
        referer,
        agent,
    ) = fields
    # The last upstream tried: nginx puts ", " or " : " between tries; no address (an
    # upstream's name, no ":") when it found no live one and answered 502 itself.
    if upstream_addr and b":" not in upstream_addr.rpartition(b" ")[2]:
        upstream = b"-"
    try:
        code = int(status)
        record = Record(
            # Interned: an app's hour of slots then holds its name once, not once a slot.
            app=sys.intern(app.decode("ascii")),
            version=sys.intern(version.decode("ascii")),
            at=float(msec),
            status=code,
            bytes_sent=int(sent),
            request_time=float(request_time),
            upstream_time=_upstream_time(upstream),
            line=b'%s - %s [%s] "%s" %s %s "%s" "%s" %s %s %s %s'
            % (
                addr,
                user,
                time_local,
                request,
                status,
                sent,
                referer,
                agent,
                host,
                request_time,
                upstream,
                version,
            ),
        )
    except (ValueError, UnicodeDecodeError):
        return None
    if not 0 <= code <= 999 or not math.isfinite(record.at):
        return None  # a time that is no time ("nan", "inf") has no slot
    return record


SERVER_ERROR = 4  # the class of 5xx, as status_class numbers them


def status_class(code: int) -> int:
    """The index of a status's class (0 for 1xx .. 4 for 5xx). A code outside 100-599
    is no HTTP status (an app may answer 999, nginx logs 000 when it sent nothing):
    counted as a server error, never left out (an app would hide its requests)."""
    return code // 100 - 1 if 100 <= code <= 599 else SERVER_ERROR


def _upstream_time(text: bytes) -> float | None:
    """$upstream_response_time: "0.004", "-", or several ("0.001, 0.004"; "0.002 : 0.003")
    when nginx tried more than one upstream or redirected internally: their sum."""
    if text == b"-":
        return None
    try:
        return float(text)  # the common case: one upstream
    except ValueError:
        pass
    total = 0.0
    seen = False
    for part in _SEPARATORS.split(text):
        part = part.strip()
        if part and part != b"-":
            total += float(part)
            seen = True
    return total if seen else None
