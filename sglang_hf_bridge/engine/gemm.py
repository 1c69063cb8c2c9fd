"""The GEMM behind every engine linear, chosen on the host that runs it.

On CPU the installed torch offers more than one matrix product for a linear layer: ``F.linear``
("aten": MKL for float32, oneDNN for bfloat16) and oneDNN's own linear ("onednn",
``mkldnn._linear_pointwise``, reading the weight as it is, so in-place weight changes -- MeZO,
adapter edits, loads -- are seen by the next call). Which is faster depends on the CPU: on an AMD
EPYC with AVX-512 oneDNN ran float32 2.2x faster than MKL; on other hosts MKL may win. So the
engine measures both once per host, dtype and layer shapes (a fraction of a second at engine
start), caches the answer on disk, and routes every linear through the winner: SGLang's parallel
layers (and, through them, its LoRA layers' base products) and the bridge's own heads.

``gemm=`` (``from_pretrained``) or ``SGLANG_HF_BRIDGE_GEMM`` force a path; ``"auto"`` (default)
measures. Off CPU only "aten" exists.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import compat

logger = logging.getLogger(__name__)

ENV = "SGLANG_HF_BRIDGE_GEMM"
CACHE_ENV = "SGLANG_HF_BRIDGE_CACHE"
PATHS = ("aten", "onednn")
LinearFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear`` through oneDNN (any leading dimensions; the weight read as stored)."""
    if x.dim() == 2:
        return compat.onednn_linear(x, weight, bias)
    out = compat.onednn_linear(x.reshape(-1, x.shape[-1]), weight, bias)
    return out.view(*x.shape[:-1], out.shape[-1])


def onednn_linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.gelu(F.linear(...))`` in one oneDNN product (GELU in the epilogue: no second pass over
    the FFN's widest activation, ~1.6x on roberta-base's up-projection in float32)."""
    flat = x.reshape(-1, x.shape[-1])
    out = compat.onednn_linear(flat, weight, bias, activation="gelu")
    return out.view(*x.shape[:-1], out.shape[-1])


LINEARS: Dict[str, LinearFn] = {"aten": F.linear, "onednn": onednn_linear}
# Linear + exact GELU fused, where the path has it (None: the model applies F.gelu itself).
LINEAR_GELUS: Dict[str, Optional[LinearFn]] = {"aten": None, "onednn": onednn_linear_gelu}


def available_paths(device: str, dtype: str = "float32") -> List[str]:
    """The paths that run ``dtype`` on ``device`` with this torch (oneDNN's CPU linear has no
    float16 kernel on CPUs without AVX512-FP16: torch raises "could not create a primitive")."""
    if device != "cpu":
        return ["aten"]
    return ["aten", "onednn"] if _onednn_runs(dtype) else ["aten"]


@functools.lru_cache(maxsize=None)
def _onednn_runs(dtype: str) -> bool:
    if not compat.onednn_linear_available():
        return False
    x = torch.ones(2, 4, dtype=getattr(torch, dtype))
    try:
        compat.onednn_linear(x, torch.ones(3, 4, dtype=x.dtype), torch.ones(3, dtype=x.dtype))
    except RuntimeError as e:  # no oneDNN kernel for this dtype on this CPU
        logger.debug("oneDNN linear unavailable in %s: %s", dtype, e)
        return False
    return True


def linear_fn(path: str) -> LinearFn:
    return LINEARS[path]


def linear_gelu_fn(path: str) -> Optional[LinearFn]:
    return LINEAR_GELUS[path]


@dataclass
class GemmChoice:
    """The path every linear uses, why (``source``: forced / cached / measured / only), and
    the measured seconds per path when measured."""

    path: str
    source: str
    seconds: Dict[str, float] = field(default_factory=dict)


def host_description() -> Dict[str, object]:
    """What decides which kernel wins: the CPU (model and SIMD flags), torch and its threads."""
    model, flags = platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = " ".join(sorted(t for t in value.split() if t.startswith(("avx", "amx", "fma"))))
                    break
    except OSError:
        pass
    return {"cpu": model, "simd": flags, "torch": torch.__version__, "threads": torch.get_num_threads()}


def _cache_file() -> str:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "sglang_hf_bridge")
    return os.path.join(root, "gemm-choice.json")


def _read_cache() -> Dict[str, dict]:
    try:
        with open(_cache_file()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, entry: dict) -> None:
    """Add one entry, atomically (a reader sees the old file or the new one); best effort."""
    path = _cache_file()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = _read_cache()
        data[key] = entry
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".gemm-choice-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home: measure again next time
        logger.debug("GEMM choice not cached (%s)", e)


def measure(paths: Sequence[str], dtype: torch.dtype, shapes: Sequence[Tuple[int, int]], tokens: int = 512,
            repeats: int = 3) -> Dict[str, float]:
    """Seconds one pass of ``shapes`` (``(out, in)`` weights at ``tokens`` rows) takes per path
    (best of ``repeats``, after one warm-up)."""
    gen = torch.Generator().manual_seed(0)
    operands = [(torch.randn(tokens, k, generator=gen).to(dtype), torch.randn(n, k, generator=gen).to(dtype),
                 torch.randn(n, generator=gen).to(dtype)) for n, k in shapes]
    seconds = {}
    with torch.no_grad():
        for path in paths:
            fn = LINEARS[path]
            best = float("inf")
            for rep in range(repeats + 1):
                start = time.perf_counter()
                for x, w, b in operands:
                    fn(x, w, b)
                elapsed = time.perf_counter() - start
                if rep:
                    best = min(best, elapsed)
            seconds[path] = best
    return seconds


def choose(device: str, dtype: str, shapes: Sequence[Tuple[int, int]], requested: Optional[str] = None) -> GemmChoice:
    """The path for a model whose linears have ``shapes``: ``requested`` (or ``SGLANG_HF_BRIDGE_GEMM``)
    when it names one, else the cached or freshly measured fastest on this host."""
    requested = requested or os.environ.get(ENV) or "auto"
    paths = available_paths(device, dtype)
    if requested != "auto":
        if requested not in PATHS:
            raise ValueError(f"gemm={requested!r}: choose one of 'auto', {', '.join(repr(p) for p in PATHS)}")
        if requested not in paths:
            raise ValueError(f"gemm={requested!r} is not available on {device} with this torch "
                             f"(available: {', '.join(paths)})")
        return GemmChoice(requested, "forced")
    if len(paths) == 1:
        return GemmChoice(paths[0], "only")
    shape_key = sorted({tuple(s) for s in shapes})
    key = hashlib.sha256(json.dumps([host_description(), dtype, shape_key], sort_keys=True).encode()).hexdigest()[:24]
    cached = _read_cache().get(key)
    if cached and cached.get("path") in paths:
        return GemmChoice(cached["path"], "cached", cached.get("seconds", {}))
    seconds = measure(paths, getattr(torch, dtype), shape_key)
    path = min(seconds, key=seconds.get)
    _write_cache(key, {"path": path, "seconds": seconds, "host": host_description(), "dtype": dtype,
                       "shapes": shape_key})
    logger.info("GEMM on this host: %s (%s)", path, ", ".join(f"{p} {s * 1e3:.1f} ms" for p, s in seconds.items()))
    return GemmChoice(path, "measured", seconds)


def encoder_linear_shapes(hf_config: Dict[str, object]) -> List[Tuple[int, int]]:
    """``(out, in)`` of an encoder layer's linears and the head's dense layer (what is measured)."""
    h = int(hf_config.get("hidden_size", 0) or 0)
    i = int(hf_config.get("intermediate_size", 0) or 0)
    if not (h and i):
        return [(768, 768)]
    return [(3 * h, h), (h, h), (i, h), (h, i)]
