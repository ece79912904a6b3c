"""What this process has read and written so far (Linux ``/proc/self/io``): how a test
tells that a refusal came before the reading, not after it."""

from __future__ import annotations


def bytes_read() -> int:
    """Bytes this process has had from read(2) so far."""
    return _counter("rchar")


def bytes_written() -> int:
    """Bytes this process has passed to write(2) so far."""
    return _counter("wchar")


def _counter(name: str) -> int:
    with open("/proc/self/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return int(fields[name])
