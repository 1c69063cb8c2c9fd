"""Resident-memory probes a benchmark's child process calls (one case per fresh interpreter).

Peaks come from ``VmHWM``, never ``ru_maxrss``: a child's ``ru_maxrss`` starts at its parent's RSS
at fork and survives ``exec``, so a parent holding models would inflate every child's peak.
"""

from __future__ import annotations

import re
from typing import Dict


def parts(out: Dict[str, float], when: str) -> None:
    """Anonymous vs file-backed resident MiB (``/proc/self/smaps_rollup``) into ``out``."""
    rollup = {}
    for line in open("/proc/self/smaps_rollup"):
        p = line.split()
        if len(p) >= 3 and p[0].endswith(":") and p[2] == "kB":
            rollup[p[0][:-1]] = int(p[1]) / 1024
    out[f"anon_after_{when}_mib"] = rollup["Anonymous"]
    out[f"file_after_{when}_mib"] = rollup["Rss"] - rollup["Anonymous"]


def peak_since_reset() -> float:
    """The process's resident high-water mark (MiB) since the last :func:`reset_peak`."""
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024


def reset_peak(out: Dict[str, float]) -> None:
    """Keep the peak so far as ``out["peak_rss_mib"]``, then reset the high-water mark."""
    out["peak_rss_mib"] = peak_since_reset()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
