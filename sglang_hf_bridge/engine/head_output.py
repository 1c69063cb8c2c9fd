"""A head's logits at every position, written straight into the caller's output rows.

Why: a masked LM's ``forward`` returns ``[B, T, vocabulary]`` logits, the largest tensor of the
call (roberta-base, 32 SST-2 prompts: 200-313 MiB in float32). Computed in one product and copied into the
padded output by the caller, it is allocated twice; a block that large is mapped fresh by the C
allocator on every call, so each call also pays a page fault per 4 KiB of it (measured: the
faults alone were ~20% of a float32 batch-32 forward on a 2-core EPYC). Here the head runs over
groups of whole sequences whose output stays under :data:`HEAD_OUTPUT_BYTES` -- a size the
allocator serves again from its heap -- and each group's rows are copied, still in cache, to the
rows :class:`~.types.LogitsDestination` names. The products are the same ones; only the row
count of each product changes (as any change of batch does).
"""

from __future__ import annotations

from itertools import accumulate
from typing import Callable, List, Optional, Sequence

import torch

from .types import EncoderSequence

# A head output under this size is served again from the allocator's heap (glibc maps blocks
# above 32 MiB fresh on every allocation); ~125 float32 / 250 bfloat16 rows of a 50k vocabulary,
# where the product is as fast per row as over a whole batch (docs/kernels.md).
HEAD_OUTPUT_BYTES = 24 << 20


def copy_rows(dst: torch.Tensor, rows: Sequence[int], values: torch.Tensor) -> None:
    """``dst[rows] = values``; a plain copy when ``rows`` is one run (a right- or left-padded
    row), several times faster than an indexed write of ``[T, vocab]`` logits."""
    n = len(rows)
    if n and int(rows[-1]) - int(rows[0]) + 1 == n:
        dst.narrow(0, int(rows[0]), n).copy_(values)
    elif n:
        index = rows if isinstance(rows, torch.Tensor) else torch.tensor(rows, dtype=torch.long)
        dst.index_copy_(0, index.to(dst.device), values.to(dst.dtype))


def sequence_groups(row_counts: Sequence[int], max_rows: int) -> List[List[int]]:
    """Consecutive sequences grouped so that a group has at most ``max_rows`` rows (a longer
    sequence is a group of its own). Depends only on the counts: every rank groups alike."""
    groups: List[List[int]] = []
    rows = 0
    for i, n in enumerate(row_counts):
        if groups and rows + n <= max_rows:
            groups[-1].append(i)
            rows += n
        else:
            groups.append([i])
            rows = n
    return groups


def head_into_destinations(apply_head: Callable[..., torch.Tensor], seqs: List[EncoderSequence],
                           starts: List[int], lens: List[int], hidden: torch.Tensor,
                           query_only_hidden: Optional[torch.Tensor], vocab_ids, width: int) -> None:
    """Every real and query-only row of ``seqs`` through ``apply_head(rows, vocab_ids, seqs,
    counts)``, group by group, into each sequence's ``logits_into`` (skipped where the tensor
    stayed in another process)."""
    n_query = [len(s.query_only or []) for s in seqs]
    query_starts = [0, *accumulate(n_query)]  # each sequence's first query-only row
    counts = [n + q for n, q in zip(lens, n_query)]
    max_rows = max(1, HEAD_OUTPUT_BYTES // (width * hidden.element_size()))
    for group in sequence_groups(counts, max_rows):
        parts = []
        for i in group:
            parts.append(hidden[starts[i]:starts[i] + lens[i]])
            if n_query[i]:
                parts.append(query_only_hidden[query_starts[i]:query_starts[i] + n_query[i]])
        logits = apply_head(parts[0] if len(parts) == 1 else torch.cat(parts), vocab_ids,
                            [seqs[i] for i in group], [counts[i] for i in group])
        offset = 0
        for i in group:
            into = seqs[i].logits_into
            if into.tensor is not None:
                copy_rows(into.tensor, into.rows, logits[offset:offset + lens[i]])
                for j, targets in enumerate(into.query_only_rows):
                    into.tensor[targets] = logits[offset + lens[i] + j].to(into.tensor.dtype)
            offset += counts[i]
