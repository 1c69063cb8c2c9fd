"""Whole-sequence result cache: an identical sequence under identical weights gets the earlier result.

Keyed by everything that decides one sequence's result -- its token, position and type ids, its
padded (query-only) positions, the positions and vocabulary ids asked for, what is returned, and
its adapter -- in a hash map (exact match of the whole key: a sequence that merely shares a
prefix with a cached one is a different key and is never served from it). Each entry remembers
the weight versions it was computed under; a lookup under other versions is a miss.

Bounded by bytes (LRU). Off unless a size is given: results can be large (``forward`` keeps
``[T, vocab]`` logits per sequence) and a user who retrains in place would pay for nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Dict, Hashable, Optional

from .types import SequenceResult


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    entries: int = 0
    max_bytes: int = 0

    def as_dict(self) -> Dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def result_nbytes(r: SequenceResult) -> int:
    total = 0
    for value in (r.logits, r.last_hidden, r.query_only_logits, r.query_only_last_hidden):
        if value is not None:
            total += value.numel() * value.element_size()
    for group in (r.hidden_states, r.query_only_hidden_states):
        for t in group or []:
            total += t.numel() * t.element_size()
    return total


def compact(r: SequenceResult) -> SequenceResult:
    """Own copies (results are views into a whole batch's tensors, which must not stay alive)."""
    def c(t):
        return None if t is None else t.clone()

    return SequenceResult(
        logits=c(r.logits), last_hidden=c(r.last_hidden), query_only_logits=c(r.query_only_logits),
        query_only_last_hidden=c(r.query_only_last_hidden),
        hidden_states=[t.clone() for t in r.hidden_states] if r.hidden_states is not None else None,
        query_only_hidden_states=([t.clone() for t in r.query_only_hidden_states]
                                  if r.query_only_hidden_states is not None else None),
    )


class ResultCache:
    def __init__(self, max_bytes: int) -> None:
        self.stats = CacheStats(max_bytes=int(max_bytes))
        self._entries: "OrderedDict[Hashable, tuple]" = OrderedDict()  # key -> (version, result, nbytes)

    def get(self, key: Hashable, version: Hashable) -> Optional[SequenceResult]:
        entry = self._entries.get(key)
        if entry is None or entry[0] != version:
            if entry is not None:  # computed under other weights: never served, dropped now
                self._drop(key)
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return entry[1]

    def put(self, key: Hashable, version: Hashable, result: SequenceResult) -> None:
        size = result_nbytes(result)
        if size > self.stats.max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        while self._entries and self.stats.bytes + size > self.stats.max_bytes:
            self._drop(next(iter(self._entries)))
            self.stats.evictions += 1
        self._entries[key] = (version, compact(result), size)
        self.stats.bytes += size
        self.stats.entries = len(self._entries)

    def _drop(self, key: Hashable) -> None:
        _, _, size = self._entries.pop(key)
        self.stats.bytes -= size
        self.stats.entries = len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.stats.bytes = self.stats.entries = 0
