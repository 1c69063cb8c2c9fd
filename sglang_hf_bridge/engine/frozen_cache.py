"""Frozen-layer activation cache: the states entering layer L, per sequence.

When nothing below layer L changes (training touches only layers >= L: LoRA with
``layers_to_transform``, MeZO on the top layers), the hidden states entering layer L are a pure
function of a sequence's token, position and type ids (and of its padded positions). They are
computed once, kept, and later calls run only layers L.. on the engine.

Split in two so tensor-parallel ranks agree: :class:`FrozenLayerIndex` (the front, one per
model) decides hits, misses and evictions and writes them into a
:class:`~sglang_hf_bridge.engine.types.FrozenPlan`; every rank's :class:`FrozenStateStore`
applies the plan to its own tensors (activations are replicated across TP ranks).

Validity: an entry carries the version of the base weights below L; any change there empties the
index. A row whose adapter has weights below L gets that adapter and its version in its key.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict, Hashable, List, Optional, Tuple

import torch

from .result_cache import CacheStats
from .types import EncoderCall, FrozenPlan, Logits


def sequence_identity(seq) -> Tuple:
    """Everything about one sequence that decides its hidden states (not what is asked of it)."""
    return (
        tuple(seq.input_ids), tuple(seq.position_ids),
        tuple(seq.token_type_ids) if seq.token_type_ids else None,
        tuple((q.input_id, q.position_id, q.token_type_id) for q in seq.query_only) if seq.query_only else None,
    )


class FrozenLayerIndex:
    def __init__(self, layer: int, max_bytes: int, bytes_per_token: int) -> None:
        self.layer = int(layer)
        self.bytes_per_token = int(bytes_per_token)
        self.stats = CacheStats(max_bytes=int(max_bytes))
        self.bypassed_calls = 0
        self._entries: "OrderedDict[Hashable, int]" = OrderedDict()  # key -> bytes
        self._base_version: Optional[int] = None

    def plan(self, call: EncoderCall, base_version: int,
             adapter_part: Callable[[Optional[str]], Optional[Hashable]]) -> FrozenPlan:
        evict: List[Hashable] = []
        if base_version != self._base_version:  # weights below L changed: nothing kept is valid
            evict += list(self._entries)
            self._entries.clear()
            self.stats.bytes = self.stats.entries = 0
            self._base_version = base_version
        keys = [(self.layer, sequence_identity(s), adapter_part(s.lora_id)) for s in call.sequences]
        compute, new_bytes = [], {}
        for i, (key, s) in enumerate(zip(keys, call.sequences)):
            if key in self._entries or key in new_bytes:
                continue
            compute.append(i)
            new_bytes[key] = (len(s.input_ids) + len(s.query_only or [])) * self.bytes_per_token
        used = set(keys)
        needed = sum(new_bytes.values()) + sum(self._entries[k] for k in used if k in self._entries)
        if needed > self.stats.max_bytes:  # this call alone does not fit: run it without the cache
            self.bypassed_calls += 1
            return FrozenPlan(layer=None, keys=keys, compute=[], evict=evict)
        for key in used:
            if key in self._entries:
                self._entries.move_to_end(key)
        incoming = sum(new_bytes.values())
        while self.stats.bytes + incoming > self.stats.max_bytes:
            victim = next(k for k in self._entries if k not in used)
            self.stats.bytes -= self._entries.pop(victim)
            evict.append(victim)
            self.stats.evictions += 1
        for key, size in new_bytes.items():
            self._entries[key] = size
            self.stats.bytes += size
        self.stats.misses += len(compute)
        self.stats.hits += len(keys) - len(compute)
        self.stats.entries = len(self._entries)
        return FrozenPlan(layer=self.layer, keys=keys, compute=compute, evict=evict)

    def clear(self) -> List[Hashable]:
        """Forget everything; returns the keys every rank must drop (sent with the next plan)."""
        keys = list(self._entries)
        self._entries.clear()
        self.stats.bytes = self.stats.entries = 0
        return keys


class FrozenStateStore:
    """One rank's tensors: key -> (states entering L [len, H], query-only states [n_q, H] or None)."""

    def __init__(self) -> None:
        self.tensors: Dict[Hashable, Tuple[torch.Tensor, Optional[torch.Tensor]]] = {}

    def apply(self, call: EncoderCall, run: Callable[[EncoderCall], "object"]):
        """Run ``call`` under its plan with ``run`` (the uncached forward)."""
        from dataclasses import replace

        plan = call.frozen
        for key in plan.evict:
            self.tensors.pop(key, None)
        if plan.layer is None:
            return run(replace(call, frozen=None))
        if plan.compute:
            prefix = EncoderCall(
                sequences=[replace(call.sequences[i], logit_positions=None) for i in plan.compute],
                logits=Logits.NONE, return_last_hidden=True, stop_layer=plan.layer,
            )
            for i, r in zip(plan.compute, run(prefix).sequences):
                qo = r.query_only_last_hidden
                self.tensors[plan.keys[i]] = (r.last_hidden.clone(), qo.clone() if qo is not None else None)
        try:
            states = [self.tensors[k] for k in plan.keys]
        except KeyError as e:
            raise RuntimeError("internal error: a frozen-layer cache entry the plan relies on is missing "
                               "on this rank") from e
        sequences = [replace(s, initial_hidden=h, query_only_initial=q) for s, (h, q) in zip(call.sequences, states)]
        return run(replace(call, sequences=sequences, start_layer=plan.layer, frozen=None))
