"""EncoderRuntime: the engine as the face sees it -- one object, one lifecycle (start, forward,
close), for 1 or N tensor-parallel ranks.

Rank 0's :class:`~.rank.RankEngine` runs in this process; ranks 1..N-1 are a
:class:`~.workers.WorkerGroup` (empty when ``tp_size == 1``). Everything that touches engine
state goes through :meth:`EncoderRuntime.collective_rpc`, which runs a rank operation on every
rank in lockstep (a plain local call when there are no workers) and moves the weight versions
by what the operation declares it writes. The caches sit in front and decide once per call.

Threads: one re-entrant lock (``runtime.lock``) serialises everything that touches engine state;
concurrent forwards are merged into shared passes by a :class:`~.batcher.CallBatcher`, so adapter
loads, MeZO's in-place updates and cache changes take effect between passes, never inside one.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from ..errors import AdapterError, EngineClosedError, WorkerError
from ..process import deferred_interrupts, free_local_port
from ..sglang_models.layout import lora_layout
from . import gemm, rank_ops
from .adapters import EngineAdapter
from .batcher import CallBatcher
from .caching import EngineCaches
from .config import EngineConfig
from .rank import RankEngine
from .types import EncoderCall, EncoderResult
from .versions import apply_effect
from .workers import WorkerGroup

logger = logging.getLogger(__name__)

WeightIterator = Iterable[Tuple[str, torch.Tensor]]


class EncoderRuntime:
    """Lifecycle: ``start(weights)`` -> ``forward(call)``* -> ``close()``."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.local: Optional[RankEngine] = None
        self.workers = WorkerGroup(config)
        self.caches = EngineCaches(self)
        self.lock = threading.RLock()
        self.batcher = CallBatcher(self._forward_locked, max_rows=config.max_running_requests)
        self._closed = False
        self.gemm_choice: Optional[gemm.GemmChoice] = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, weights: WeightIterator) -> "EncoderRuntime":
        """Start every rank: workers first (they meet rank 0 in SGLang's collectives while it
        builds its ModelRunner), then rank 0 with ``weights``; workers read the checkpoint."""
        from .. import compat

        compat.check_parallel_runtime_available(self.config.device, self.config.tp_size)
        # Every rank computes with the path rank 0 chose (workers get the config with it).
        self.gemm_choice = gemm.choose(self.config.device, self.config.dtype,
                                       gemm.encoder_linear_shapes(self.config.hf_config), self.config.gemm)
        self.config.gemm = self.gemm_choice.path
        port = free_local_port()
        try:
            self.workers.launch(port)
            self.local = self.workers.rank0_engine(port)  # set first: close() must release it
            self.local.start(weights)
            self.workers.wait_ready()
        except BaseException:
            self.close()
            raise
        self.caches.versions.bump_base(None)
        return self

    @property
    def started(self) -> bool:
        return self.local is not None and self.local.started and not self._closed

    def close(self) -> None:
        """Stop the workers and rank 0's engine, free caches and the z scratch memory."""
        from .directions import release_scratch

        with self.lock:
            if self._closed:
                return
            self._closed = True
            self.caches.drop_all()
            self.workers.stop()
            if self.local is not None:
                self.local.close()
            release_scratch()

    def _engine(self) -> RankEngine:
        if self._closed or self.local is None or not self.local.started:
            raise EngineClosedError("the SGLang engine of this model is closed")
        return self.local

    # ------------------------------------------------------------------ rank 0's state (read)
    @property
    def model(self):
        """Rank 0's SGLang-side model (its parameters are rank 0's shards)."""
        return self._engine().model

    @property
    def model_runner(self):
        return self._engine().model_runner

    @property
    def adapters(self):
        """Rank 0's adapter pool (read it; change it with :meth:`load_adapter`/:meth:`unload_adapter`)."""
        return self._engine().adapters

    def adapter(self, lora_id: str) -> EngineAdapter:
        return self.adapters.adapters[lora_id]

    def pool_stats(self) -> Dict[str, int]:
        with self.lock:
            return self._engine().pool_stats()

    def pool_capacity(self) -> Dict[str, int]:
        """What :meth:`pool_stats` reads when nothing is in flight."""
        return dict(self._engine().initial_pool_stats)

    # ------------------------------------------------------------------ the one fan-out
    def collective_rpc(self, fn: Callable[..., Any], *args: Any, gather: bool = True) -> List[Any]:
        """Run ``fn(rank_engine, *args)`` on every rank in lockstep; returns each rank's result,
        rank 0 first (workers return None when ``gather`` is False). ``fn`` must be a module-level
        rank operation (declared with :func:`~.versions.writes`); the weight versions move by
        what it declares. Holds the engine lock; a Ctrl-C in the middle is raised once every rank
        is done, so no worker is left inside a collective."""
        with self.lock, deferred_interrupts():
            engine = self._engine()
            try:
                self.workers.send_call(fn, args, gather)
                try:
                    mine = fn(engine, *args)
                finally:
                    engine.after_operation(fn, args)
                return [mine] + self.workers.receive()
            finally:
                apply_effect(self.caches.versions, fn, args)

    # ------------------------------------------------------------------ what the face asks
    def forward(self, call: EncoderCall) -> EncoderResult:
        """Run one call through the caches (when configured) and every rank; concurrent calls
        from other threads may share the pass."""
        self._engine()
        return self.batcher.submit(call)

    def _forward_locked(self, call: EncoderCall) -> EncoderResult:
        with self.lock:
            adapters = self._engine().adapters.adapters
            for i, s in enumerate(call.sequences):
                if s.lora_id is not None and s.lora_id not in adapters:
                    raise AdapterError(f"row {i}'s adapter was deleted before the call ran")
            return self.caches.forward(call, self._forward_all_ranks)

    def _forward_all_ranks(self, call: EncoderCall) -> EncoderResult:
        return self.collective_rpc(rank_ops.rank_forward, call, gather=False)[0]

    def load_adapter(self, name: str, weights, rank: int, scaling: float, head=None) -> EngineAdapter:
        """Load on every rank, or on none: a failure or interrupt anywhere unloads it again.
        ``head``: the adapter's own task head (engine names -> tensors), replicated on every rank."""
        lora_id = uuid.uuid4().hex
        with self.lock, deferred_interrupts():
            self._engine().adapters.check_room(rank)
            try:
                self.collective_rpc(rank_ops.rank_load_adapter, name, weights, rank, scaling, lora_id, head)
                return self.adapter(lora_id)
            except BaseException:
                self.discard_adapter(lora_id)
                raise

    def unload_adapter(self, lora_id: str) -> None:
        self.collective_rpc(rank_ops.rank_unload_adapter, lora_id)

    def discard_adapter(self, lora_id: str) -> None:
        """Unload ``lora_id`` wherever it is loaded (rollback; a no-op where it is not)."""
        try:
            self.collective_rpc(rank_ops.rank_discard_adapter, lora_id)
        except (WorkerError, EngineClosedError) as e:  # a dead worker or a closed engine: nothing left to undo
            logger.debug("rollback of adapter %s skipped: %s", lora_id, e)

    def full_parameters(self) -> Dict[str, torch.Tensor]:
        """Every engine parameter whole: gathered from all ranks, SGLang's padding removed, fused
        q/k/v stacked as [q; k; v] (each parameter's layout says how)."""
        layouts = self.model.layouts
        per_rank = self.collective_rpc(rank_ops.rank_parameters)
        return {name: layouts[name].gather([r[name] for r in per_rank]) for name in per_rank[0]}

    def adapter_matrices(self, lora_id: str) -> Dict[Tuple[int, str], Tuple[torch.Tensor, torch.Tensor]]:
        """Full copies of an adapter's ``(A, B)`` per ``(layer, module)``, gathered from all ranks."""
        layouts = self.model.layouts
        per_rank = self.collective_rpc(rank_ops.rank_adapter_matrices, lora_id)
        return {(layer, module): tuple(lora_layout(layouts, layer, module, which).gather(  # type: ignore[misc]
                    [r[(layer, module)][i] for r in per_rank]) for i, which in enumerate("AB"))
                for layer, module in per_rank[0]}
