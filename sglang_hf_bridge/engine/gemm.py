"""The GEMM behind every engine linear, chosen on the host that runs it.

On CPU the installed torch offers more than one matrix product for a linear layer: ``F.linear``
("aten": MKL for float32, oneDNN for bfloat16), oneDNN's own linear ("onednn",
``mkldnn._linear_pointwise``, reading the weight as it is, so in-place weight changes -- MeZO,
adapter edits, loads -- are seen by the next call) and the same linear on weights reordered once
into oneDNN's blocked layout ("onednn-packed", :mod:`.packed_weights`: copies kept in step with
every write). Which is fastest depends on the CPU: on an AMD EPYC with AVX-512 oneDNN ran float32
2.2x faster than MKL, and packing gained another 1.3-1.8x at short inputs; on other hosts MKL may
win. So the engine measures every path once per host, dtype and layer shapes (a fraction of a
second at engine start), caches the answer on disk, and routes every linear through the winner:
SGLang's parallel layers (and, through them, its LoRA layers' base products) and the bridge's
own heads.

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
from .packed_weights import PackedWeights, packing_is_exact

logger = logging.getLogger(__name__)

ENV = "SGLANG_HF_BRIDGE_GEMM"
CACHE_ENV = "SGLANG_HF_BRIDGE_CACHE"
PATHS = ("aten", "onednn", "onednn-packed")
PACKED = "onednn-packed"
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
    if device != "cpu" or not _onednn_runs(dtype):
        return ["aten"]
    return ["aten", "onednn", PACKED] if _packing_runs(dtype) else ["aten", "onednn"]


@functools.lru_cache(maxsize=None)
def _packing_runs(dtype: str) -> bool:
    x = torch.ones(2, 4, dtype=getattr(torch, dtype))
    try:
        compat.onednn_linear(x, compat.onednn_pack_weight(torch.ones(3, 4, dtype=x.dtype)), None)
    except (RuntimeError, compat.SGLangLayoutError) as e:  # no reorder op, or no kernel for it
        logger.debug("oneDNN packed weights unavailable in %s: %s", dtype, e)
        return False
    return True


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


def path_functions(path: str, packed: Optional[PackedWeights] = None) -> Tuple[LinearFn, Optional[LinearFn]]:
    """``(linear, linear + GELU or None)`` for ``path``; the packed path computes through ``packed``."""
    if path == PACKED:
        if packed is None:
            raise ValueError("the onednn-packed path needs the rank's PackedWeights")
        return packed.linear, packed.linear_gelu
    return LINEARS[path], LINEAR_GELUS[path]


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


# Row counts the choice is measured at: one short batch (a sentence or two) and one long one.
MEASURED_ROWS = (32, 512)


def measure(paths: Sequence[str], dtype: torch.dtype, shapes: Sequence[Tuple[int, int]],
            rows: Sequence[int] = MEASURED_ROWS, repeats: int = 3) -> Dict[str, float]:
    """Seconds per 512 rows one pass of ``shapes`` (``(out, in)`` weights) takes per path, the
    mean over inputs of ``rows`` rows (best of ``repeats`` each, after one warm-up). The packed
    path is timed on weights packed beforehand: its steady state."""
    gen = torch.Generator().manual_seed(0)
    weights = [(torch.randn(n, k, generator=gen).to(dtype), torch.randn(n, generator=gen).to(dtype)) for n, k in shapes]
    seconds = {}
    with torch.no_grad():
        for path in paths:
            if path == PACKED:
                fn, operands = onednn_linear, [(compat.onednn_pack_weight(w), b) for w, b in weights]
            else:
                fn, operands = LINEARS[path], weights
            per_row = []
            for m in rows:
                xs = [torch.randn(m, w.shape[1], generator=gen).to(dtype) for w, _ in weights]
                best = float("inf")
                for rep in range(repeats + 1):
                    start = time.perf_counter()
                    for x, (w, b) in zip(xs, operands):
                        fn(x, w, b)
                    elapsed = time.perf_counter() - start
                    if rep:
                        best = min(best, elapsed)
                per_row.append(best / m)
            seconds[path] = 512 * sum(per_row) / len(per_row)
    return seconds


def _host_key(*parts) -> str:
    return hashlib.sha256(json.dumps([host_description(), *parts], sort_keys=True).encode()).hexdigest()[:24]


def packing_exactness(dtype: str, shapes: Sequence[Tuple[int, int]]) -> Dict[str, bool]:
    """Whether packed and plain products give the same bits on this host for these shapes
    (:func:`~.packed_weights.packing_is_exact`), at one row and at the row counts of batches;
    cached on disk beside the choice, and in this process (the choice and every rank ask)."""
    key = "exact-" + _host_key(dtype, sorted({tuple(s) for s in shapes}))
    if key in _EXACTNESS:
        return dict(_EXACTNESS[key])
    cached = _read_cache().get(key)
    if cached is not None and all(isinstance(cached.get(k), bool) for k in ("one_row", "batches")):
        exact = {k: cached[k] for k in ("one_row", "batches")}
    else:
        t = getattr(torch, dtype)
        exact = {"one_row": packing_is_exact(t, shapes, rows=(1,)), "batches": packing_is_exact(t, shapes)}
        _write_cache(key, {**exact, "host": host_description(), "dtype": dtype})
    _EXACTNESS[key] = exact
    return dict(exact)


_EXACTNESS: Dict[str, Dict[str, bool]] = {}  # this process's answers (a read-only cache dir measures once)


def packed_weights_for(dtype: str, shapes: Sequence[Tuple[int, int]]) -> PackedWeights:
    """A rank's store for the packed path: single rows plain where they differ when packed."""
    return PackedWeights(single_rows_plain=not packing_exactness(dtype, checked_shapes(shapes))["one_row"])


def checked_shapes(shapes: Sequence[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """The model's shapes and an output width no vector length divides (as the vocabulary's)."""
    shape_class = sorted({tuple(s) for s in shapes})
    return shape_class + [(1003, shape_class[0][1])]


def choose(device: str, dtype: str, shapes: Sequence[Tuple[int, int]], requested: Optional[str] = None) -> GemmChoice:
    """The path for a model whose linears have ``shapes``: ``requested`` (or ``SGLANG_HF_BRIDGE_GEMM``)
    when it names one, else the cached or freshly measured fastest on this host."""
    requested = requested or os.environ.get(ENV) or "auto"
    paths = available_paths(device, dtype)
    if requested not in ("auto", *PATHS):
        raise ValueError(f"gemm={requested!r}: choose one of 'auto', {', '.join(repr(p) for p in PATHS)}")
    if requested != "auto" and requested not in paths:
        raise ValueError(f"gemm={requested!r} is not available on {device} with this torch "
                         f"(available: {', '.join(paths)})")
    if PACKED in (paths if requested == "auto" else [requested]) and \
            not packing_exactness(dtype, checked_shapes(shapes))["batches"]:
        if requested == PACKED:
            raise ValueError(f"gemm={PACKED!r}: on this host oneDNN's product from packed {dtype} weights differs "
                             "in its last bits from the product from plain ones, so answers would depend on "
                             "which copy ran; use 'onednn'")
        paths.remove(PACKED)
    if requested != "auto":
        return GemmChoice(requested, "forced")
    if len(paths) == 1:
        return GemmChoice(paths[0], "only")
    shape_key = sorted({tuple(s) for s in shapes})
    key = _host_key(dtype, shape_key, list(MEASURED_ROWS))
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
