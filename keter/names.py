"""The one grammar for every string from a bundle that reaches nginx, a path,
a command line or a log line.

Every check here is a pure function that returns the value (normalised where
that is said) or raises ``ValueError(reason)``, and never anything else,
whatever it is given: the reason is short, names what is wrong and quotes at
most a bounded, escaped piece of the value. Components import from here
instead of keeping their own patterns, so "what may a host name be" has one
answer.

Host names follow Keter's rules as far as nginx can carry them safely:

* labels of ``a-z``, ``0-9``, ``-`` and ``_``, lower-cased; ``-`` never at a
  label's edge and ``_`` never at its start (keter's internal nginx server
  names start with ``_``, so no bundle can claim them);
* a wildcard is a whole label ``*`` in any position, as Keter's host map takes
  it (``*.example.com``, ``foo.*.example.com``, ``example.*``). Keter's ``*``
  matches exactly one label (see ``host_matches``); a name made of wildcards
  only (``*``, ``*.*``) is refused, since it would claim every host name.

Which name wins when several match a request (Keter's ``LabelMap``): an exact
name wins over every wildcard; between wildcards, labels are compared from the
right (the top-level domain first) and at the first position where one has a
literal label and the other ``*``, the literal one wins. Two names matching
the same host always have the same number of labels, so this is a total
order on them: ``host_precedence`` is the sort key (smaller wins), e.g.
``foo.bar.example.com`` < ``*.bar.example.com`` < ``foo.*.example.com`` <
``*.*.example.com``. nginx picks regex server names in the order they appear
in its config, so the renderer writes them sorted by this key.

``nginx_server_name`` gives a name's nginx form: every wildcard becomes an
anchored regex (``~^foo\\.[^.]+\\.example\\.com$``), a leading one too: nginx's
own ``*.example.com`` would match at any depth (``a.b.example.com``) and rank
above every regex, where Keter's ``*`` is exactly one label.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable

# -- bounds --------------------------------------------------------------------------

MAX_APP_NAME = 64
MAX_HOST = 253
MAX_LABEL = 63
MAX_URL_PATH = 1024
MAX_HEADER_VALUE = 3900  # nginx's token bound, less room for its quotes and escapes
MAX_PATH_BYTES = 4096  # PATH_MAX
MAX_PATH_PART_BYTES = 255  # NAME_MAX
# Bytes of one quoted string in nginx's config: its parser reads the config in 4 KiB
# buffers and refuses a longer token ("too long parameter"); the margin is for the
# buffer's other contents.
NGINX_TOKEN_MAX = 4000
LOG_LIMIT = 300  # characters of one quoted value in a log line
PROBLEMS_LIMIT = 4096  # characters of a capped list of problems (shared decision 5)

# The variable keter's nginx config defines as a literal "$": nginx strings
# have no escape for "$", so ``nginx_quote`` writes ``${keter_dollar}``.
NGINX_DOLLAR_VARIABLE = "keter_dollar"

# -- app names -----------------------------------------------------------------------

_APP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def validate_app_name(name: object) -> str:
    """Check a bundle's file stem (``NAME`` of ``NAME.keter``); returns it unchanged.

    The name becomes part of folder names, log file names and the nginx
    config, so it is limited to a plain ASCII alphabet, starts with a letter
    or digit and has no "..".
    """
    if not isinstance(name, str) or not name:
        raise ValueError("the name is empty")
    if len(name) > MAX_APP_NAME:
        raise ValueError(
            f"the name is {len(name)} characters long; at most {MAX_APP_NAME} are allowed"
        )
    if ".." in name:
        raise ValueError('the name contains ".."')
    if not _APP_NAME.fullmatch(name):
        raise ValueError(
            "the name must start with a letter or digit and use only letters, digits, '.', '_', '-'"
        )
    return name


# -- host names ----------------------------------------------------------------------

WILDCARD = "*"
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9_-]{0,61}[a-z0-9])?")
# A label Keter's "*" stands for, in nginx's regex syntax.
_ANY_LABEL = "[^.]+"


def validate_host(host: object, *, wildcard: bool = True) -> str:
    """Check a virtual host name and return it lower-cased.

    Labels as described in the module docstring, 253 characters in all;
    single-label names (``localhost``) are fine. With ``wildcard=False`` a
    ``*`` label is refused (a name to redirect or connect to). Refused too:
    IP literals (nginx would treat them as a listen address match, not a
    virtual host; ``ip_address`` reads those), non-ASCII (use the ``xn--``
    form) and a trailing dot, because ``example.com.`` would silently never
    match what browsers send.
    """
    if not isinstance(host, str) or not host:
        raise ValueError("the host name is empty")
    # Checked before lower-casing: some non-ASCII letters lower-case to ASCII
    # (the Kelvin sign becomes "k"), which would let look-alike names through.
    if not host.isascii():
        raise ValueError("the host name has non-ASCII characters (use the xn-- punycode form)")
    name = host.lower()
    if len(name) > MAX_HOST:
        raise ValueError(
            f"the host name is {len(name)} characters long; at most {MAX_HOST} are allowed"
        )
    if _is_ip_literal(name):
        raise ValueError("an IP address is not a host name")
    if name.endswith("."):
        raise ValueError(
            "the host name ends with a dot; write it without, since browsers send it without"
        )
    labels = name.split(".")
    for label in labels:
        _check_label(label, wildcard)
    if all(label == WILDCARD for label in labels):
        raise ValueError(
            "a wildcard needs at least one named label (as in *.example.com): "
            "a name of wildcards only would claim every host"
        )
    return name


def _check_label(label: str, wildcard: bool) -> None:
    if label == WILDCARD:
        if not wildcard:
            raise ValueError("expected one host name, not a wildcard")
        return
    if not label:
        raise ValueError("the host name has an empty label (two dots in a row or a leading dot)")
    if "*" in label:
        raise ValueError(
            f"a wildcard must be a whole label, as in *.example.com, not {log_text(label, 70)}"
        )
    if len(label) > MAX_LABEL:
        raise ValueError(f"the label {log_text(label, 20)} is longer than {MAX_LABEL} characters")
    if _LABEL.fullmatch(label):
        return
    bad = sorted({c for c in label if not (c.isalnum() or c in "-_")})
    if bad:
        raise ValueError(f"the host name contains {_quoted(''.join(bad))}")
    if label.startswith("_"):
        raise ValueError(f"the label {label} starts with '_'")
    if label.endswith("_"):
        raise ValueError(f"the label {label} ends with '_'")
    raise ValueError(f"the label {label} starts or ends with '-'")


def is_wildcard(host: str) -> bool:
    """Whether a (validated) host name has a ``*`` label."""
    return WILDCARD in host.split(".")


def host_matches(pattern: str, host: str) -> bool:
    """Whether Keter routes a request for ``host`` to a (validated) name ``pattern``.

    Case-insensitive; a trailing dot on ``host`` is ignored as Keter does;
    each ``*`` stands for exactly one label.
    """
    host = host.lower().removesuffix(".")
    wanted, given = pattern.lower().split("."), host.split(".")
    if len(wanted) != len(given) or "" in given:
        return False
    return all(w in (WILDCARD, g) for w, g in zip(wanted, given, strict=True))


def host_precedence(host: str) -> tuple[tuple[bool, str], ...]:
    """Sort key for Keter's precedence among names matching one request: smaller wins.

    Labels from the right; at each, a literal label sorts before ``*``.
    Names of different lengths never match the same request, so their
    relative order does not matter; the labels themselves make it stable.
    """
    return tuple((label == WILDCARD, label) for label in reversed(host.split(".")))


def nginx_name_part(app: str) -> str:
    """An app name (validated by the caller: keter's own sites have names of their own,
    ``_dashboard``) as part of the names keter gives nginx (upstreams, log formats,
    zones), distinct for distinct apps though nginx compares some of them ignoring
    case: every character but lower-case letters and digits is hex-escaped as
    ``_xx``. Escapes never put two '_' in a row, so a ``__`` suffix cannot make one
    app's name another's."""
    return "".join(c if c.isdigit() or ("a" <= c <= "z") else f"_{ord(c):02x}" for c in app)


def nginx_server_name(host: str) -> str:
    """A validated host name as an nginx ``server_name`` argument.

    Exact names stay as they are; a wildcard becomes an anchored,
    case-insensitive-by-nginx regex where each ``*`` matches one label, as in
    Keter (nginx's own ``*.example.com`` would also match ``a.b.example.com``).
    Raises ValueError for a name ``validate_host`` would refuse.
    """
    name = validate_host(host)
    labels = name.split(".")
    if WILDCARD not in labels:
        return name
    # Labels are [a-z0-9_-] only: nothing in them is special to a regex or to nginx.
    parts = [_ANY_LABEL if label == WILDCARD else label for label in labels]
    return "~^" + r"\.".join(parts) + "$"


def _is_ip_literal(name: str) -> bool:
    candidate = name.strip("[]")
    try:
        ipaddress.ip_address(candidate)
        return True
    except ValueError:
        pass
    try:
        # inet_aton also takes the short and hex spellings (127.1, 0x7f.1) that
        # resolvers and browsers treat as addresses.
        socket.inet_aton(candidate)
        return True
    except (OSError, ValueError, UnicodeError):
        return False


# -- IP literals, upstream hosts, ports ----------------------------------------------


def validate_ip(text: object) -> str:
    """An IPv4 or IPv6 address (IPv6 optionally in brackets), in canonical form.

    IPv6 zone ids (``fe80::1%eth0``) are refused: they name an interface of
    this machine, nginx does not take them, and they carry arbitrary text.
    """
    if not isinstance(text, str) or not text:
        raise ValueError("the address is empty")
    if "%" in text:
        raise ValueError("an IPv6 zone id (%...) is not allowed in an address")
    if not text.isascii():
        raise ValueError("the address has non-ASCII characters")
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        raise ValueError(f"{_quoted(text)} is not an IP address") from None
    if bare is not text and address.version != 6:
        raise ValueError("only an IPv6 address goes in brackets")
    return str(address)


def validate_upstream_host(text: object) -> str:
    """A server to connect to: an IP address (canonical, no zone id) or a host name.

    No wildcards; the name is lower-cased.
    """
    if isinstance(text, str) and ("%" in text or ":" in text or text.startswith("[")):
        return validate_ip(text)  # only addresses have these; the reason says why
    try:
        return validate_ip(text)
    except ValueError:
        pass
    return validate_host(text, wildcard=False)


def validate_port(value: object) -> int:
    """A TCP port, 1-65535, given as an integer (a YAML boolean is not one)."""
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
        return value
    raise ValueError(f"expected a port 1-65535, got {_shown(value)}")


# -- URLs and headers ----------------------------------------------------------------

# A request path: nothing that ends or changes an nginx token or location
# (no quotes, spaces, braces, ';', '#', '$', '\\') and nothing a request line
# could not carry.
_URL_PATH = re.compile(r"/[A-Za-z0-9._~!&()*+,=:@%/-]{0,1023}")
# A path keter only sends in a request line (a health check): printable ASCII.
_REQUEST_PATH = re.compile(r"/[\x21-\x7e]{0,1023}")
_URL = re.compile(r"(?:[A-Za-z][A-Za-z0-9+.-]*:|/)[\x21-\x7e]{0,2047}")
_HEADER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_HEADER_VALUE = re.compile(r"[\x20-\x7e]{0,3900}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")


def validate_url_path(text: object) -> str:
    """A URL path that nginx may carry unquoted (a ``location``): ``/`` then safe characters."""
    if isinstance(text, str) and _URL_PATH.fullmatch(text):
        return text
    raise ValueError(
        'expected a URL path starting with "/" of letters, digits and '
        f"._~!&()*+,=:@%/- (at most {MAX_URL_PATH}), got {_shown(text)}"
    )


def validate_request_path(text: object) -> str:
    """A path keter puts in an HTTP request line only: ``/`` then printable ASCII, no spaces."""
    if isinstance(text, str) and _REQUEST_PATH.fullmatch(text):
        return text
    raise ValueError(f'expected a URL path starting with "/" without spaces, got {_shown(text)}')


def validate_url(text: object) -> str:
    """An absolute URL (``scheme:...``) or a path, printable ASCII without spaces,
    quotes or backslashes (percent-encode those)."""
    if not (isinstance(text, str) and _URL.fullmatch(text)):
        raise ValueError(f"expected an absolute URL without spaces or quotes, got {_shown(text)}")
    if '"' in text or "\\" in text:
        raise ValueError(f"percent-encode quotes and backslashes in {_shown(text)}")
    nginx_quote(text)  # nginx sends it: each "$" grows to 15 characters in its config
    return text


def validate_header_name(text: object) -> str:
    """An HTTP header name: letters, digits, '-' and '_', starting with a letter or digit."""
    if isinstance(text, str) and _HEADER_NAME.fullmatch(text):
        return text
    raise ValueError(f"expected a header name of letters, digits and '-', got {_shown(text)}")


def validate_header_value(text: object) -> str:
    """An HTTP header value (also used for realms): printable ASCII, at most
    ``MAX_HEADER_VALUE`` characters, that fits one nginx string once quoted."""
    if not (isinstance(text, str) and _HEADER_VALUE.fullmatch(text)):
        raise ValueError(
            f"expected printable ASCII of at most {MAX_HEADER_VALUE} characters, got {_shown(text)}"
        )
    nginx_quote(text)  # each "$" grows to 15 characters: the quoted text must still fit
    return text


def validate_realm(text: object) -> str:
    """A basic-auth realm: a header value without ``"`` or ``\\``. nginx writes it into
    ``WWW-Authenticate: Basic realm="..."`` as it is: either would end or break the
    quoted string the client reads."""
    realm = validate_header_value(text)
    if '"' in realm or "\\" in realm:
        raise ValueError(f'a realm cannot hold " or \\, got {_shown(realm)}')
    return realm


# -- environment, command lines, file paths ------------------------------------------


# The one name /bin/sh (dash) refuses to export with most values ("Illegal number"):
# an app's processes get their environment from it (keter.processes.spawn).
SHELL_OWN = frozenset({"OPTIND"})


def validate_env_name(text: object) -> str:
    """An environment variable name, shell style: letters, digits and '_'."""
    if isinstance(text, str) and text in SHELL_OWN:
        raise ValueError(f"{text} is the shell's own (it starts the app's processes)")
    if isinstance(text, str) and _ENV_NAME.fullmatch(text):
        return text
    raise ValueError(f"expected a variable name of letters, digits and _, got {_shown(text)}")


def validate_arg(text: object) -> str:
    """A command-line argument or environment value: any text without NUL that is
    UTF-8 encodable (a lone surrogate cannot be passed to a program)."""
    if not isinstance(text, str):
        raise ValueError(f"expected a string, got {_type_name(text)}")
    if "\0" in text:
        raise ValueError("the text contains a NUL character")
    _check_utf8(text, "the text")
    return text


def validate_file_path(text: object) -> str:
    """A relative or absolute file path from a bundle or a config.

    Non-empty, no NUL, UTF-8 encodable (no lone surrogates), printable (no
    control characters or line breaks), at most 4096 bytes with parts of at
    most 255. Where it may lead (inside a bundle or not) is the caller's check.
    """
    if not isinstance(text, str) or not text:
        raise ValueError(f"expected a file path, got {_shown(text)}")
    if "\0" in text:
        raise ValueError("the path contains a NUL character")
    encoded = _check_utf8(text, "the path")
    if not text.isprintable():
        raise ValueError(f"the path has control or invisible characters: {_quoted(text)}")
    if len(encoded) > MAX_PATH_BYTES:
        raise ValueError(f"the path is longer than {MAX_PATH_BYTES} bytes")
    if any(len(part) > MAX_PATH_PART_BYTES for part in encoded.split(b"/")):
        raise ValueError(f"a part of the path is longer than {MAX_PATH_PART_BYTES} bytes")
    return text


# Characters an nginx file path cannot hold: '"' and '\\' would end or escape its quoted
# string, ';' '{' '}' end a directive, '$' makes nginx expand variables in it.
NGINX_PATH_UNSAFE = '"\\$;{}'


def nginx_path_unsafe(path: str) -> list[str]:
    """The characters of ``NGINX_PATH_UNSAFE`` in ``path``, sorted, each once."""
    return sorted({c for c in path if c in NGINX_PATH_UNSAFE})


def validate_nginx_file_path(text: object) -> str:
    """An absolute file path nginx will read: ``validate_file_path``, and none of
    ``NGINX_PATH_UNSAFE`` (quoting cannot carry them)."""
    path = validate_file_path(text)
    if not path.startswith("/"):
        raise ValueError(f"expected an absolute path, got {_quoted(path)}")
    _fits_nginx_token(f'"{path}"', "the path")  # written quoted, without escapes
    unsafe = nginx_path_unsafe(path)
    if unsafe:
        raise ValueError(
            f"the path has characters nginx cannot take in a file path ({' '.join(unsafe)}): "
            f"{_quoted(path)}"
        )
    return path


def _check_utf8(text: str, what: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"{what} is not valid Unicode (a lone surrogate): {_quoted(text)}"
        ) from None


# -- nginx ---------------------------------------------------------------------------


def nginx_quote(text: object) -> str:
    """A double-quoted nginx string meaning exactly ``text``.

    Backslashes and quotes are escaped; ``$`` becomes ``${keter_dollar}``
    (keter's config defines that variable as "$"). Control characters and
    text that is not valid Unicode are refused: nginx has no escape for them.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected text, got {_type_name(text)}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ValueError(f"the text has control characters: {_quoted(text)}")
    _check_utf8(text, "the text")
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = escaped.replace("$", "${" + NGINX_DOLLAR_VARIABLE + "}")
    return _fits_nginx_token(f'"{escaped}"', "the text")


def _fits_nginx_token(quoted: str, what: str) -> str:
    """``quoted``, if nginx's parser takes it as one token (``NGINX_TOKEN_MAX``)."""
    size = len(quoted.encode("utf-8"))
    if size > NGINX_TOKEN_MAX:
        raise ValueError(
            f"{what} is too long for nginx: {size} bytes once quoted, at most {NGINX_TOKEN_MAX}"
        )
    return quoted


# -- log lines -----------------------------------------------------------------------

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def log_text(value: object, limit: int = LOG_LIMIT) -> str:
    """Text from a bundle or an app, made safe for one log line or a terminal.

    Control characters, escape sequences, invisible and line-breaking
    characters and lone surrogates are shown as Python-style escapes
    (``\\x1b``, ``\\u2028``, ``\\udcff``); printable text, backslashes
    included, is kept (so text already escaped, like ``describe``'s, reads the same). After
    ``limit`` characters of the value the rest is counted, not shown:
    ``... (N more characters)``. The result is one printable line of at most
    about ``limit`` + 40 characters. Non-text values are shown as ``str()``
    would, escaped the same way.
    """
    if not isinstance(value, str):
        try:
            value = str(value)
        except Exception:  # a value whose __str__ fails (or a huge int) is named by its type
            value = f"<{type(value).__name__}>"
    limit = max(int(limit), 1)
    out: list[str] = []
    size = 0
    for i, char in enumerate(value):
        piece = _ESCAPES.get(char) or (char if char.isprintable() else _escape(char))
        if size + len(piece) > limit:
            out.append(_more_characters(len(value) - i))
            break
        out.append(piece)
        size += len(piece)
    return "".join(out)


def cut_text(text: str, limit: int) -> str:
    """``text`` itself if it has at most ``limit`` characters, else its first ``limit``
    and ``... (N more characters)``; nothing is escaped (``log_text`` escapes)."""
    if len(text) <= limit:
        return text
    return text[:limit] + _more_characters(len(text) - limit)


def _more_characters(count: int) -> str:
    return f"... ({count} more characters)"


def _escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def cap_problems(problems: Iterable[str], limit: int = PROBLEMS_LIMIT) -> list[str]:
    """A list of reasons shortened to about ``limit`` characters in all.

    Each reason is made log-safe (``log_text``); once the total would pass
    ``limit``, the rest are counted in a last entry "... and N more problems".
    """
    items = list(problems)
    kept: list[str] = []
    size = 0
    for i, item in enumerate(items):
        text = log_text(item, limit=min(limit, 1000))
        if size + len(text) > limit and kept:
            rest = len(items) - i
            kept.append(f"... and {rest} more problem{'s' if rest != 1 else ''}")
            break
        kept.append(text)
        size += len(text) + 2  # "; " between reasons
    return kept


# -- helpers -------------------------------------------------------------------------


def _quoted(text: str, limit: int = 60) -> str:
    return '"' + log_text(text, limit).replace('"', '\\"') + '"'


def _shown(value: object) -> str:
    if isinstance(value, str):
        return _quoted(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if abs(value) < 10**40 else "a number of more than 40 digits"
    if isinstance(value, float):
        return repr(value)
    return _type_name(value)


def _type_name(value: object) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    names.update({list: "a list", dict: "a mapping", type(None): "nothing (null)"})
    return names.get(type(value), type(value).__name__)
