"""Splitting one call into engine batches that fit the pools (whole sequences only)."""

from __future__ import annotations

from typing import List

from ..errors import SequenceTooLongError


def plan_chunks(lengths: List[int], token_budget: int, max_rows: int) -> List[List[int]]:
    """Greedy, order-preserving split of sequence indices into chunks of at most
    ``token_budget`` tokens and ``max_rows`` sequences. A sequence is never cut: cutting a
    bidirectional encoder's input changes every token's result."""
    if token_budget <= 0 or max_rows <= 0:
        raise RuntimeError("the engine has no free request rows or KV slots (pool leak?)")
    chunks: List[List[int]] = []
    current: List[int] = []
    tokens = 0
    for i, n in enumerate(lengths):
        if n > token_budget:
            raise SequenceTooLongError(
                f"sequence {i} has {n} tokens, more than the engine's token budget "
                f"({token_budget}); raise max_num_tokens"
            )
        if current and (tokens + n > token_budget or len(current) >= max_rows):
            chunks.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += n
    if current:
        chunks.append(current)
    return chunks
