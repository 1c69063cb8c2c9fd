"""The caches in front of a runtime: weight versions, the whole-sequence result cache and the
frozen-layer activation cache, applied to each :class:`EncoderCall` before the engine sees it.

Only reuse that reproduces the uncached answer is done -- never a cached *prefix* (wrong for a
bidirectional encoder; ``docs/caching.md``). What "the same answer" means:

* result-cache hits return the stored tensors of an earlier, identical computation; a row's
  values can differ from a fresh run by float round-off only because the fresh run's batch is
  composed differently (CPU GEMM kernels block by batch size), measured <= 1e-6;
* frozen-layer hits give layers >= L the very states layers < L produced before; again only
  batch composition differs (<= 1e-6 measured), and bitwise for a batch replayed as before.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Dict, Hashable, List, Optional

from .. import compat
from .frozen_cache import FrozenLayerIndex, sequence_identity
from .result_cache import ResultCache
from .types import EncoderCall, EncoderResult, FrozenPlan, SequenceResult
from .versions import WeightVersions, engine_layer_of

Run = Callable[[EncoderCall], EncoderResult]


class EngineCaches:
    """One per model, owned by the front (:class:`~.runtime.EncoderRuntime`, rank 0)."""

    def __init__(self, front) -> None:
        self.front = front
        self.versions = WeightVersions()
        self.result: Optional[ResultCache] = None
        self.frozen: Optional[FrozenLayerIndex] = None
        self._evict_debt: List[Hashable] = []  # frozen entries the ranks still have to drop

    # ---- configuration (under the engine lock: takes effect between passes) -------------------
    def configure_result_cache(self, max_bytes: Optional[int]) -> None:
        with self.front.lock:
            self.result = ResultCache(max_bytes) if max_bytes else None

    def configure_frozen_cache(self, layer: Optional[int], max_bytes: int) -> None:
        """Replace the frozen-layer index whole (the new one is built before the old one goes)."""
        config = self.front.model.config
        new = None
        if layer is not None and layer > 0:
            if layer >= config.num_hidden_layers:
                raise ValueError(f"frozen layer {layer} must be below num_hidden_layers={config.num_hidden_layers}")
            element = 2 if self.front.config.dtype in ("float16", "bfloat16") else 4
            new = FrozenLayerIndex(layer, max_bytes, config.hidden_size * element)
        with self.front.lock:
            old, self.frozen = self.frozen, new
            if old is not None:
                self._evict_debt += old.clear()

    def clear(self) -> None:
        with self.front.lock:
            if self.result is not None:
                self.result.clear()
            if self.frozen is not None:
                self._evict_debt += self.frozen.clear()

    def drop_all(self) -> None:
        """At close: free every cached tensor and turn the caches off."""
        with self.front.lock:
            self.result = self.frozen = None
            self._evict_debt = []

    def stats(self) -> Dict[str, Optional[Dict[str, int]]]:
        with self.front.lock:
            out = {"result": self.result.stats.as_dict() if self.result else None, "frozen_layer": None}
            if self.frozen is not None:
                out["frozen_layer"] = dict(self.frozen.stats.as_dict(), layer=self.frozen.layer,
                                           bypassed_calls=self.frozen.bypassed_calls)
            return out

    # ---- versions ----------------------------------------------------------------------------
    def adapter_version(self, lora_id: Optional[str]):
        if lora_id is None:
            return None
        adapter = self.front.adapter(lora_id)
        counters = sum(compat.tensor_version(t) for pair in adapter.views.values() for t in pair)
        counters += sum(compat.tensor_version(t) for t in adapter.head.values())  # its own head, if any
        return lora_id, self.versions.adapter_version(lora_id, counters)

    def weights_version(self) -> int:
        """One number that moves on every change: the clock plus the LoRA pool buffers' and the
        engine parameters' in-place version counters (all only ever grow)."""
        with self.front.lock:
            return self.versions.clock + self.front.adapters.buffer_version() + self._parameter_counters(None)

    def base_version(self, below: Optional[int] = None) -> Hashable:
        """The base components' version (layers < ``below``, or all): the explicit stamps plus
        rank 0's engine parameters' in-place version counters, so an edit through a view the face
        hands out (``get_input_embeddings().weight`` at tp_size=1) is never served stale."""
        return self.versions.base_version(below), self._parameter_counters(below)

    def _parameter_counters(self, below: Optional[int]) -> int:
        groups = getattr(self, "_parameter_groups", None)
        if groups is None or groups[0] is not self.front.model:
            model = self.front.model
            by_layer: Dict[int, list] = {}
            for name, param in model.named_parameters():
                by_layer.setdefault(engine_layer_of(name), []).append(param)
            groups = self._parameter_groups = (model, sorted(by_layer.items()))
        return sum(compat.tensor_version(p) for layer, params in groups[1] if below is None or layer < below
                   for p in params)

    def result_version(self, lora_id: Optional[str]) -> Hashable:
        return self.base_version(), self.adapter_version(lora_id)

    def _frozen_adapter_part(self, lora_id: Optional[str]) -> Optional[Hashable]:
        if lora_id is None:
            return None
        layers = self.front.adapter(lora_id).layers
        if layers and min(layers) >= self.frozen.layer:
            return None  # the adapter changes nothing below L
        return self.adapter_version(lora_id)

    # ---- the call ------------------------------------------------------------------------------
    def forward(self, call: EncoderCall, run: Run) -> EncoderResult:
        if self.result is None:
            return self._with_frozen_plan(call, run)
        # A stored result must own its logits (the caller's output rows are the caller's to change).
        call = replace(call, sequences=[replace(s, logits_into=None) if s.logits_into is not None else s
                                        for s in call.sequences])
        signature = call.output_signature()
        results: List[Optional[SequenceResult]] = [None] * len(call.sequences)
        todo: Dict[Hashable, int] = {}
        duplicates: List[tuple] = []
        versions = {}
        for i, s in enumerate(call.sequences):
            key = (signature, sequence_identity(s),
                   tuple(s.logit_positions) if s.logit_positions is not None else None, s.lora_id)
            if key in todo:  # the same sequence twice in one call: computed once
                duplicates.append((i, todo[key]))
                self.result.stats.hits += 1
                continue
            if s.lora_id not in versions:  # once per adapter and call (it reads the pool counters)
                versions[s.lora_id] = self.result_version(s.lora_id)
            hit = self.result.get(key, versions[s.lora_id])
            if hit is not None:
                results[i] = hit
            else:
                todo[key] = i
        if todo:
            sub = self._with_frozen_plan(replace(call, sequences=[call.sequences[i] for i in todo.values()]), run)
            for (key, i), r in zip(todo.items(), sub.sequences):
                results[i] = r
                self.result.put(key, versions[call.sequences[i].lora_id], r)
        for i, j in duplicates:
            results[i] = results[j]
        return EncoderResult(sequences=results)

    def _with_frozen_plan(self, call: EncoderCall, run: Run) -> EncoderResult:
        debt, self._evict_debt = self._evict_debt, []
        if self.frozen is None or call.output_hidden_states or call.start_layer or call.stop_layer:
            if debt:
                call = replace(call, frozen=FrozenPlan(layer=None, keys=[], compute=[], evict=debt))
            return run(call)
        plan = self.frozen.plan(call, self.base_version(below=self.frozen.layer), self._frozen_adapter_part)
        plan.evict = debt + plan.evict
        try:
            return run(replace(call, frozen=plan))
        except BaseException:
            # The index already counts this call's new entries; a failed call may not have stored
            # them on every rank. Forget everything (ranks drop what they hold with the next plan).
            self._evict_debt += self.frozen.clear() + list(plan.keys)
            raise
