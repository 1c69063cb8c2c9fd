"""Generic process helpers (nothing SGLang-specific): free ports, parent-death signal, names."""

from __future__ import annotations

import importlib
import socket
import sys
from typing import Any, Callable


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
