"""Cache controls on the HF face: the engine's whole-sequence result cache and frozen-layer
activation cache (``sglang_hf_bridge.engine.caching``), their stats and the weight version."""

from __future__ import annotations

from typing import Dict, Optional

MIB = 1 << 20


class EngineCacheMixin:
    def enable_result_cache(self, max_mb: float = 256.0) -> None:
        """Reuse results of identical sequences (whole sequence, same weights and adapter).
        Off by default: ``forward`` results hold ``[T, vocab]`` logits per sequence."""
        if max_mb <= 0:
            raise ValueError(f"max_mb must be > 0, got {max_mb}")
        self.runtime.caches.configure_result_cache(int(max_mb * MIB))

    def disable_result_cache(self) -> None:
        self.runtime.caches.configure_result_cache(None)

    def enable_frozen_layer_cache(self, from_layer: int, max_mb: float = 1024.0) -> None:
        """Keep the hidden states entering layer ``from_layer`` per sequence and run only the
        layers from there on. Exact while nothing below ``from_layer`` changes (a change there
        empties the cache); rows whose adapter has weights below it are keyed by that adapter."""
        if not isinstance(from_layer, int) or not 0 < from_layer < self.config.num_hidden_layers:
            top = self.config.num_hidden_layers - 1
            raise ValueError(f"from_layer must be an int in [1, {top}], got {from_layer!r}")
        if max_mb <= 0:
            raise ValueError(f"max_mb must be > 0, got {max_mb}")
        self.runtime.caches.configure_frozen_cache(from_layer, int(max_mb * MIB))

    def disable_frozen_layer_cache(self) -> None:
        self.runtime.caches.configure_frozen_cache(None, 0)

    def clear_caches(self) -> None:
        self.runtime.caches.clear()

    def cache_stats(self) -> Dict[str, Optional[Dict[str, int]]]:
        """``{"result": {...} | None, "frozen_layer": {...} | None}`` with hits, misses,
        evictions, bytes, entries, max_bytes (and the frozen layer, bypassed calls)."""
        return self.runtime.caches.stats()

    @property
    def weights_version(self) -> int:
        """Moves on every change of engine weights or adapter matrices."""
        return self.runtime.caches.weights_version()
