"""Entries of incoming/ that are no regular file, and a watch that sees files opened.

The watcher must refuse each of these without opening, following or blocking
on it (tests/test_watcher.py against the component, tests/test_faults_incoming.py
against the daemon). Every maker takes the entry's path and ``secret``: a file
outside incoming/ that a link may lead to.
"""

from __future__ import annotations

import os
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer


def make_fifo(path: Path, secret: Path) -> None:
    os.mkfifo(path)


def make_socket(path: Path, secret: Path) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))  # the socket file stays after close


def make_device(path: Path, secret: Path) -> None:
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # what /dev/zero is


def make_loop(path: Path, secret: Path) -> None:
    os.symlink(path.name, path)  # a link to itself: ELOOP for whoever follows it


def make_link_out(path: Path, secret: Path) -> None:
    os.symlink(secret, path)


# kind -> (its maker, what keter's refusal calls it: "it is a ...").
NOT_REGULAR: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "fifo": (make_fifo, "FIFO"),
    "socket": (make_socket, "socket"),
    "device": (make_device, "character device"),
    "loop": (make_loop, "symbolic link"),
    "linkout": (make_link_out, "symbolic link"),
}


def poke(path: Path) -> None:
    """More events on the entry, without following or blocking on it."""
    os.utime(path, ns=(0, time.time_ns()), follow_symlinks=False)
    if stat.S_ISFIFO(os.lstat(path).st_mode):
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)  # a writer that needs no reader
        os.write(fd, b"data nobody reads")
        os.close(fd)


class OpenWatch:
    """Every opening of a file in ``folder``, seen by an inotify watch of the test's own
    (so a test sees whether keter read through a link)."""

    def __init__(self, folder: Path) -> None:
        self.opened: list[str] = []
        opened = self.opened

        class Record(FileSystemEventHandler):
            def on_opened(self, event) -> None:
                opened.append(os.fsdecode(event.src_path))

        self._observer = Observer()
        self._observer.schedule(Record(), str(folder), recursive=False)
        self._observer.start()

    def close(self) -> None:
        self._observer.stop()
        self._observer.join()
