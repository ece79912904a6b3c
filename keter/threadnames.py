"""Tell the kernel each keter thread's name, so ``top -H`` shows which part works.

Python names its threads for itself only; the kernel (``top -H``, ``ps -L``,
``/proc/PID/task/TID/comm``) calls every one of them ``python``, and an
operator whose keter spends a core cannot tell the nginx writer from the
unpacker. Each of keter's threads calls ``name_this_thread`` first thing
(watchdog's are named from outside, once started). The kernel keeps 15 bytes,
which every keter name fits (``keter-processes``).
"""

from __future__ import annotations

import threading

KERNEL_NAME_BYTES = 15  # TASK_COMM_LEN less its NUL


def kernel_name(name: str) -> bytes:
    """What the kernel keeps of a thread name: ASCII, at most 15 bytes."""
    return name.encode("ascii", "replace")[:KERNEL_NAME_BYTES]


def name_this_thread(name: str | None = None) -> None:
    """Give the calling thread its Python name (or ``name``) in the kernel.

    The main thread's kernel name is the process's own (``ps``, ``pidof``).
    """
    name_thread(threading.current_thread(), name)


def name_thread(thread: threading.Thread, name: str | None = None) -> None:
    """Give a started thread of this process its Python name (or ``name``) in the kernel.

    Best effort: without /proc only ``top -H`` loses the name.
    """
    try:
        with open(f"/proc/self/task/{thread.native_id}/comm", "wb") as comm:
            comm.write(kernel_name(name or thread.name))
    except OSError:
        pass  # no /proc, or the thread has ended
