"""Generic process helpers (nothing SGLang-specific): free ports, parent-death signal, names."""

from __future__ import annotations

import importlib
import socket
import sys
from typing import Any, Callable, Optional


def free_local_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_parent_death_signal() -> None:
    """Linux: have the kernel SIGKILL this process when the process that spawned it dies, so TP
    workers never outlive the user's process (even on SIGKILL of the parent)."""
    import ctypes
    import signal

    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def qualified_name(obj: Callable[..., Any]) -> str:
    """``module.qualname`` of a function or class: how callables travel to worker processes."""
    return f"{obj.__module__}.{obj.__qualname__}"


def resolve_qualified_name(path: str) -> Any:
    """Inverse of :func:`qualified_name` (imports the module; never unpickles code)."""
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ImportError(f"cannot resolve {path!r}: {e}") from e


def interface_of_address(address: str) -> Optional[str]:
    """The name of the local network interface holding IPv4 ``address`` (a host name is
    resolved first), e.g. ``"lo"`` for 127.0.0.1; None when no local interface has it."""
    import fcntl
    import ipaddress
    import struct

    try:
        ip = socket.gethostbyname(address)
    except OSError:
        return None
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
            except OSError:
                continue
        if socket.inet_ntoa(packed[20:24]) == ip:
            return name
    if ipaddress.ip_address(ip).is_loopback:
        return "lo"
    return None


def process_state(pid: Optional[int]) -> Optional[str]:
    """Linux state letter of a process ("R" running, "S" sleeping, "T" stopped, "Z" zombie...),
    None when it is gone (or not on this host)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(")") + 2]


class deferred_interrupts:
    """Context manager: a Ctrl-C (SIGINT) that arrives inside the block is held back and raised
    as ``KeyboardInterrupt`` when the block ends, so a state change (an adapter load, a lockstep
    operation every TP rank must finish) happens whole. Only the main thread receives signals;
    elsewhere, and inside another such block, it does nothing. No counter to leak: whether a
    block is already holding interrupts is read from the installed handler itself."""

    def __enter__(self):
        import signal
        import threading

        self._installed, self._received = False, False
        if threading.current_thread() is threading.main_thread():
            if not getattr(signal.getsignal(signal.SIGINT), "holds_interrupts", False):
                try:
                    self._previous = signal.signal(signal.SIGINT, self._hold)
                    self._installed = True
                except ValueError:  # not the main interpreter
                    pass
        return self

    def _hold(self, signum, frame) -> None:
        self._received = True

    _hold.holds_interrupts = True  # type: ignore[attr-defined]

    def __exit__(self, exc_type, exc, tb) -> bool:
        import signal

        if self._installed:
            self._installed = False
            signal.signal(signal.SIGINT, self._previous)
            if self._received and exc_type is None:
                raise KeyboardInterrupt
        return False
