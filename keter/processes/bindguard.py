"""The bind guard: an app binds no port of ``port-range`` but the ones keter gave it.

Without it an app (any user may bind any unprivileged port) can bind every free
port of the range: every other app's deploy then fails with "no free port", and
an app that crashes once finds its port taken for good. With it, the kernel
refuses (``EPERM``) a bind by any process of a guarded cgroup to a port inside
``port-range`` that is not one of that cgroup's own; ports outside the range are
the app's business.

How: two BPF programs of type ``BPF_PROG_TYPE_CGROUP_SOCK_ADDR``, one per
address family (``BPF_CGROUP_INET4_BIND``, ``BPF_CGROUP_INET6_BIND``), attached
to the deploy's cgroup v2 before its first process runs. A program is a dozen
instructions made here, its ports immediate constants: no map, no compiler, no
library, only the ``bpf(2)`` system call through ctypes. Attaching without
flags replaces what was attached before, so a process moved to another port
gets a new guard in one call per family; nothing under the cgroup may attach
its own. keter keeps no descriptor: the attachment holds the program, and
removing the cgroup releases it.

Where the kernel or keter's privileges allow none of it (no cgroup v2, no
``CAP_BPF``, a kernel without the attach type), ``unavailable`` says why once at
start and apps run unguarded, as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import struct
from collections.abc import Iterable
from pathlib import Path

# bpf(2): the system call's number per architecture (asm/unistd.h).
_SYSCALLS = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "i686": 357, "armv7l": 386}
_BPF_PROG_LOAD = 5
_BPF_PROG_ATTACH = 8
_PROG_TYPE_CGROUP_SOCK_ADDR = 18
_ATTACH_INET4_BIND = 8
_ATTACH_INET6_BIND = 9
ATTACH_TYPES = (_ATTACH_INET4_BIND, _ATTACH_INET6_BIND)
_ATTR_SIZE = 128  # of union bpf_attr: more than any command here uses, the rest zero

# struct bpf_sock_addr: user_port, network byte order in the low 16 bits.
_USER_PORT = 24
# Opcodes (linux/bpf_common.h, linux/bpf.h).
_LDX_MEM_W = 0x61  # BPF_LDX | BPF_MEM | BPF_W
_ALU_END_TO_BE = 0xDC  # BPF_ALU | BPF_END | BPF_TO_BE: to host order, on any host
_MOV64_K = 0xB7  # BPF_ALU64 | BPF_MOV | BPF_K
_JEQ_K, _JGT_K, _JLT_K = 0x15, 0x25, 0xA5  # BPF_JMP | BPF_JEQ/JGT/JLT | BPF_K
_EXIT = 0x95  # BPF_JMP | BPF_EXIT
MAX_PORTS = 512  # far more than a deploy's processes need; keeps a program tiny

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class GuardError(OSError):
    """The kernel refused to load or attach a guard."""


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One struct bpf_insn (little-endian hosts: dst_reg is the low nibble)."""
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def program(port_range: tuple[int, int], ports: Iterable[int]) -> bytes:
    """The instructions: allow (1) a bind outside ``port_range`` or to one of ``ports``,
    deny (0, the caller's EPERM) any other port of the range. Port 0 (the kernel picks
    one outside the range, which keter's config check makes sure of) is outside it."""
    low, high = port_range
    allowed = sorted({p for p in ports if low <= p <= high})
    if len(allowed) > MAX_PORTS:
        raise ValueError(f"at most {MAX_PORTS} ports per guard, not {len(allowed)}")
    checks = [(_JLT_K, low), (_JGT_K, high)] + [(_JEQ_K, p) for p in allowed]
    # r2 = port (host order); r0 = 1; each check jumps to the final exit with r0 still 1;
    # falling through all of them sets r0 = 0.
    code = [_insn(_LDX_MEM_W, dst=2, src=1, off=_USER_PORT), _insn(_ALU_END_TO_BE, dst=2, imm=16)]
    code.append(_insn(_MOV64_K, dst=0, imm=1))
    for i, (op, value) in enumerate(checks):
        code.append(_insn(op, dst=2, off=len(checks) - i, imm=value))
    code += [_insn(_MOV64_K, dst=0, imm=0), _insn(_EXIT)]
    return b"".join(code)


def _bpf(command: int, attr: ctypes.Array) -> int:
    number = _SYSCALLS.get(platform.machine())
    if number is None:
        raise GuardError(errno.ENOSYS, f"bpf(2) unknown on {platform.machine()}")
    result = _libc.syscall(number, command, ctypes.byref(attr), ctypes.sizeof(attr))
    if result < 0:
        code = ctypes.get_errno()
        raise GuardError(code, os.strerror(code))
    return int(result)


def _load(instructions: bytes, attach_type: int) -> int:
    """Load one program; its fd. A verifier refusal carries the verifier's log."""
    insns = ctypes.create_string_buffer(instructions, len(instructions))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(4096)
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    # prog_type, insn_cnt, insns, license, log_level, log_size, log_buf, kern_version,
    # prog_flags, prog_name[16], prog_ifindex, expected_attach_type.
    struct.pack_into(
        "=IIQQIIQII16sII",
        attr,
        0,
        _PROG_TYPE_CGROUP_SOCK_ADDR,
        len(instructions) // 8,
        ctypes.addressof(insns),
        ctypes.addressof(license_),
        0,
        0,
        0,
        0,
        0,
        b"keter_bind",
        0,
        attach_type,
    )
    try:
        return _bpf(_BPF_PROG_LOAD, attr)
    except GuardError as exc:
        if exc.errno != errno.EACCES and exc.errno != errno.EINVAL:
            raise
    # The verifier refused it: load again with its log, to say why.
    struct.pack_into("=IIQ", attr, 24, 1, len(log), ctypes.addressof(log))
    try:
        return _bpf(_BPF_PROG_LOAD, attr)
    except GuardError as exc:
        verdict = log.value.decode(errors="replace").strip().splitlines()[-3:]
        raise GuardError(exc.errno, f"{exc.strerror}: {' | '.join(verdict)}") from None


def _attach(cgroup_fd: int, prog_fd: int, attach_type: int) -> None:
    """Attach without flags: it replaces the program attached before, and nothing below
    the cgroup may attach one of its own."""
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("=IIII", attr, 0, cgroup_fd, prog_fd, attach_type, 0)
    _bpf(_BPF_PROG_ATTACH, attr)


def guard(cgroup: Path, port_range: tuple[int, int], ports: Iterable[int]) -> None:
    """Let the processes of ``cgroup`` bind, of ``port_range``, only ``ports`` (replacing
    an earlier guard); GuardError (an OSError) if the kernel refuses."""
    instructions = program(port_range, ports)
    cgroup_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for attach_type in ATTACH_TYPES:
            prog_fd = _load(instructions, attach_type)
            try:
                _attach(cgroup_fd, prog_fd, attach_type)
            finally:
                os.close(prog_fd)  # the attachment holds the program
    finally:
        os.close(cgroup_fd)


def unavailable(parent: Path, port_range: tuple[int, int]) -> str | None:
    """Once at start: why no guard can be set under ``parent`` (keter's cgroup subtree),
    or None. Tried for real, on a cgroup of its own made and removed here."""
    probe = parent / "bindguard-check"
    try:
        probe.mkdir(exist_ok=True)
    except OSError as exc:
        return f"cannot make a cgroup to try it in: {exc.strerror or exc}"
    try:
        guard(probe, port_range, ())
    except OSError as exc:
        return f"the kernel refused it: {exc.strerror or exc}"
    finally:
        with contextlib.suppress(OSError):  # a leftover is removed at keter's next start
            probe.rmdir()
    return None
