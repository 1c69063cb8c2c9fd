"""The structural operations every rank runs in lockstep, as plain functions ``fn(engine, *args)``
of a :class:`~.rank.RankEngine`. The front calls them through
:meth:`~.runtime.EncoderRuntime.collective_rpc` (the same call for 1 or N ranks); workers
resolve them by ``module.qualname``. Weight-changing ZO operations live in :mod:`.weights`.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from .versions import AdapterWrite, writes


@writes(None)
def rank_forward(engine, call):
    """One call's forward on this rank (only rank 0's result is used)."""
    return engine.forward(call)


@writes(lambda name, weights, rank, scaling, lora_id, head=None: AdapterWrite(lora_id))
def rank_load_adapter(engine, name: str, weights, rank: int, scaling: float, lora_id: str, head=None) -> None:
    engine.adapters.load(name, weights, rank, scaling, lora_id, head)


@writes(lambda lora_id: AdapterWrite(lora_id))
def rank_unload_adapter(engine, lora_id: str) -> None:
    engine.adapters.unload(lora_id)
    engine.__dict__.get("zo_method_state", {}).pop(lora_id, None)  # a ZO method's state for it (weights.py)


@writes(lambda lora_id: AdapterWrite(lora_id))
def rank_discard_adapter(engine, lora_id: str) -> None:
    """Rollback of a load that failed somewhere: unload it here if this rank holds it."""
    engine.adapters.discard(lora_id)


@writes(None)
def rank_parameters(engine) -> Dict[str, torch.Tensor]:
    """This rank's engine parameters (its shards), detached; workers send copies."""
    return {n: p.detach() for n, p in engine.model.named_parameters()}


@writes(None)
def rank_adapter_matrices(engine, lora_id: str) -> Dict[Tuple[int, str], Tuple[torch.Tensor, torch.Tensor]]:
    """This rank's A/B views of an adapter, copied to CPU."""
    adapter = engine.adapters.adapters[lora_id]
    return {key: tuple(t.detach().cpu().clone() for t in adapter.matrices(key)) for key in adapter.views}
