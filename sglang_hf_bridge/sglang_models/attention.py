"""Bidirectional attention within each sequence of a pass, straight from the pass's q/k/v.

Real tokens: one SDPA call per *run of equal-length sequences*, not per sequence: the batch of a length-sorted
loader holds several sequences of each length, and a call's fixed cost (~20-40 us on a 2-core CPU,
about what a 28-token sequence's attention itself takes) is paid once per run. Torch's CPU
attention computes each (sequence, head) of a batched call exactly as it computes that sequence on
its own, so grouping changes no bit (checked per kernel path in tests/test_attention_runs.py).
"""

from __future__ import annotations

from typing import Iterator, List, Sequence, Tuple

import torch
import torch.nn.functional as F


def _runs(lengths: Sequence[int]) -> Iterator[Tuple[int, int]]:
    """``(length, count)`` of each run of equal consecutive lengths."""
    i = 0
    while i < len(lengths):
        j = i
        while j + 1 < len(lengths) and lengths[j + 1] == lengths[i]:
            j += 1
        yield lengths[i], j - i + 1
        i = j + 1


def _batched(t: torch.Tensor, count: int, length: int) -> torch.Tensor:
    """``[count * length, heads, dim]`` rows as SDPA's ``[count, heads, length, dim]`` (a view)."""
    return t.reshape(count, length, t.shape[-2], t.shape[-1]).transpose(1, 2)


def sequence_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: Sequence[int],
                       scale: float) -> torch.Tensor:
    """``q``/``k``/``v``: ``[tokens, heads, dim]``, consecutive sequences of ``lengths`` tokens;
    every token attends to its own sequence. Returns ``[tokens, heads * dim]``."""
    outs: List[torch.Tensor] = []
    first = 0
    for length, count in _runs(lengths):
        rows = slice(first, first + count * length)
        o = F.scaled_dot_product_attention(*(_batched(t[rows], count, length) for t in (q, k, v)), scale=scale)
        outs.append(o.transpose(1, 2).reshape(count * length, -1))
        first += count * length
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def query_only_attention(q: torch.Tensor, key_segments: Sequence[Tuple[int, int, int]], k: torch.Tensor,
                         v: torch.Tensor, scale: float) -> torch.Tensor:
    """Padded positions' attention: ``q`` ``[queries, heads, dim]`` in ``key_segments`` order,
    each ``(count, key start, key length)`` -- that many queries attend to those keys (their
    sequence's real tokens); nobody attends to them. Returns ``[queries, heads * dim]``.

    One call per sequence, not per run: with 1-3 queries over more keys, torch's float32 CPU
    attention gives a batched sequence other bits (~1e-7) than the same sequence alone, and a
    padded row usually has exactly one query-only token."""
    outs: List[torch.Tensor] = []
    first = 0
    for count, start, length in key_segments:
        qs, ks, vs = q[first:first + count], k[start:start + length], v[start:start + length]
        o = F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (qs, ks, vs)), scale=scale)
        outs.append(o.transpose(0, 1).reshape(count, -1))
        first += count
    return outs[0] if len(outs) == 1 else torch.cat(outs)
