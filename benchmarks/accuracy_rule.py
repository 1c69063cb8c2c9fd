"""How this project judges half-precision answers: the engine in bfloat16/float16 must lose no more
accuracy than transformers in the same dtype, both measured against transformers in float32 on the
same weights. One rule for ``tests/test_half_precision.py`` and ``benchmarks/device_check.py``; why
these bounds, with the ratios measured on this project's checkpoints, is in the test module's
docstring. Imports torch only."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

# ours' error <= RATIO[stat] x transformers' + 1 ulp; agreement >= transformers' - max(MARGIN, 1/N).
RATIO = {"mean": 1.5, "max": 2.0}
MARGIN = 0.05
# The prompts the ratios above were measured on (RoBERTa vocabulary; label words " great",
# " terrible", " good", " bad").
PROBE_TEXTS = [
    "The movie was <mask>.",
    "A much longer sentence about a <mask> film that I watched yesterday with two friends.",
    "Short <mask>",
    "It was a dark and stormy <mask>, and the rain fell in torrents.",
    "Paris is the <mask> of France.",
    "I <mask> this.",
]
PROBE_LABEL_WORDS = [372, 6587, 205, 1099]


def ulp(dtype: torch.dtype, magnitude: float) -> float:
    """One unit in the last place of ``dtype`` at ``magnitude``."""
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(max(magnitude, 1e-30)))


def measure(x: torch.Tensor, ref: torch.Tensor) -> Dict[str, float]:
    """Max / mean abs error of ``x`` against ``ref`` over rows of the last dimension, and (for a last
    dimension >= 2 / >= 5) top-1 agreement / top-5 overlap; ``n`` = rows compared."""
    x, ref = (torch.as_tensor(t).detach().float().cpu() for t in (x, ref))
    if ref.ndim == 0:
        x, ref = x.reshape(1, 1), ref.reshape(1, 1)
    x, ref = x.reshape(-1, x.shape[-1]), ref.reshape(-1, ref.shape[-1])
    d = (x - ref).abs()
    out = {"max": d.max().item(), "mean": d.mean().item(), "n": x.shape[0]}
    if x.shape[-1] >= 2:
        out["top1"] = (x.argmax(-1) == ref.argmax(-1)).float().mean().item()
    if x.shape[-1] >= 5:
        a, b = x.topk(5).indices, ref.topk(5).indices
        out["top5"] = sum(len(set(p.tolist()) & set(q.tolist())) for p, q in zip(a, b)) / (5 * x.shape[0])
    return out


@dataclass
class Bound:
    """One checked statistic: ``ours`` against ``limit`` (derived from ``theirs``)."""

    stat: str  # "max", "mean", "top1", "top5"
    ours: float
    theirs: float
    limit: float
    ok: bool
    higher_is_better: bool


def half_precision_bounds(ours, theirs, ref, dtype: torch.dtype) -> Tuple[List[Bound], dict, dict]:
    """Every bound of the rule for one comparison; also returns both measurements."""
    m_ours, m_theirs = measure(ours, ref), measure(theirs, ref)
    slack = ulp(dtype, torch.as_tensor(ref).detach().float().abs().max().item())
    bounds = []
    for stat in ("max", "mean"):
        limit = RATIO[stat] * m_theirs[stat] + slack
        bounds.append(Bound(stat, m_ours[stat], m_theirs[stat], limit, m_ours[stat] <= limit, False))
    margin = max(MARGIN, 1 / m_ours["n"])
    for stat in ("top1", "top5"):
        if stat in m_ours:
            limit = m_theirs[stat] - margin
            bounds.append(Bound(stat, m_ours[stat], m_theirs[stat], limit, m_ours[stat] >= limit, True))
    return bounds, m_ours, m_theirs
