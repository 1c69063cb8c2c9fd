"""HF-named views of the engine's weights and adapter matrices, and in-place ZO operations on them.

Every HF parameter (``roberta.encoder.layer.0.attention.self.query.weight``, PEFT's
``...query.lora_A.weight``) maps to a view of this rank's engine memory plus the index of that
view inside the full HF-shaped tensor, following the weight map's shard rules. Random directions
``z`` are drawn per HF name from ``(seed, name)`` at full HF shape and sliced per rank, so a
trajectory does not depend on fused layouts or on ``tp_size``. The operations are rank
operations (``fn(engine, *args)``) for :meth:`EncoderRuntime.collective_rpc`.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from .. import compat
from ..sglang_models.weight_map import (
    QKV_SHARDS,
    ffn_padded_dim,
    real_extent,
    real_intermediate_size,
    shard_rule,
    weight_map_for,
)
from .directions import NamedSlice, add_scaled_directions, zo_update
from .versions import writes


def _tp() -> Tuple[int, int]:
    from sglang.srt.runtime_context import get_parallel

    p = get_parallel()
    return p.tp_rank, p.tp_size


def _vocab_range(model, engine_name: str) -> Tuple[int, int]:
    emb = model.lm_head.word_embeddings if engine_name.startswith("lm_head.") else model.embeddings.word_embeddings
    return compat.vocab_shard_range(emb)


def _rank_slice(model, engine_name: str, data: torch.Tensor, shard, rank: int, tp: int):
    """(view of this rank's memory, its index in the full HF tensor, the full HF shape)."""
    rule = shard_rule(engine_name)
    if rule == "qkv":
        local = data.shape[0] // 3
        i = QKV_SHARDS.index(shard)
        view = data[i * local : (i + 1) * local]
        return view, (slice(rank * local, (rank + 1) * local),), (local * tp,) + tuple(data.shape[1:])
    if rule == "vocab":
        start, end = _vocab_range(model, engine_name)
        return data[: end - start], (slice(start, end),), (model.config.vocab_size,) + tuple(data.shape[1:])
    if rule in ("dim0", "dim1"):
        dim = 0 if rule == "dim0" else 1
        per_rank = data.shape[dim]
        total = per_rank * tp
        if ffn_padded_dim(engine_name) == dim:  # only the real (unpadded) part is a weight
            total = real_intermediate_size(model.config)
        n = real_extent(per_rank, rank, total)
        view = data.narrow(dim, 0, n)
        index = (slice(None),) * dim + (slice(rank * per_rank, rank * per_rank + n),)
        shape = list(data.shape)
        shape[dim] = total
        return view, index, tuple(shape)
    return data, tuple(slice(None) for _ in data.shape), tuple(data.shape)


def hf_parameter_slices(model) -> Dict[str, NamedSlice]:
    """HF name -> slice of this rank's engine parameter (views: in-place changes are live)."""
    rank, tp = _tp()
    names = weight_map_for(model.config)
    duplicates = names.saved_duplicates(tied=True)  # stand for another engine tensor either way
    out: Dict[str, NamedSlice] = {}
    for engine_name, param in model.named_parameters():
        for ckpt_name, shard in names.engine_to_checkpoint_names(engine_name):
            if ckpt_name in duplicates:
                continue
            full = names.to_hf_name(ckpt_name)
            view, index, shape = _rank_slice(model, engine_name, param.data, shard, rank, tp)
            out[full] = NamedSlice(full, shape, view, index)
    return out


def adapter_slices(engine, lora_id: str, peft_names: Dict[Tuple[int, str, str], str]) -> Dict[str, NamedSlice]:
    """PEFT name -> slice of this rank's LoRA pool slot for one adapter."""
    adapter = engine.adapters.adapters[lora_id]
    out = {}
    for key, (a, b) in adapter.views.items():
        layer, module = key
        if (layer, module, "A") not in peft_names:
            continue  # a zero slice SGLang needs in its fused qkv, not part of the PEFT adapter
        for which, view in (("A", a), ("B", b)):
            name = peft_names[(layer, module, which)]
            dim, offset, total = adapter.placement[(key, which)]
            if dim is None:
                index, shape = (slice(None), slice(None)), tuple(view.shape)
            else:
                n = view.shape[dim]
                index = (slice(None),) * dim + (slice(offset, offset + n),)
                shape = tuple(total if d == dim else view.shape[d] for d in range(2))
            out[name] = NamedSlice(name, shape, view, index)
    return out


# --- lockstep rank operations (``fn(engine, *args)``) ---------------------------------------------
@writes(lambda names, *_: ("base", names))
def rank_perturb_weights(engine, names: List[str], seed: int, scale: float) -> None:
    add_scaled_directions(hf_parameter_slices(engine.model), names, seed, scale)


@writes(lambda names, *_: ("base", names))
def rank_update_weights(engine, names, seed, lr, projected_grad, weight_decay, no_decay, restore=0.0) -> None:
    zo_update(hf_parameter_slices(engine.model), names, seed, lr, projected_grad, weight_decay, no_decay, restore)


@writes(lambda lora_id, *_: ("adapter", lora_id))
def rank_perturb_adapter(engine, lora_id: str, peft_names, names, seed: int, scale: float) -> None:
    add_scaled_directions(adapter_slices(engine, lora_id, peft_names), names, seed, scale)


@writes(lambda lora_id, *_: ("adapter", lora_id))
def rank_update_adapter(engine, lora_id, peft_names, names, seed, lr, projected_grad, weight_decay, no_decay,
                        restore=0.0) -> None:
    zo_update(adapter_slices(engine, lora_id, peft_names), names, seed, lr, projected_grad, weight_decay, no_decay,
              restore)


@writes(lambda source_id, target_id: ("adapter", target_id))
def rank_copy_adapter(engine, source_id: str, target_id: str) -> None:
    """Copy one adapter's matrices into another loaded with the same targets and rank."""
    src, dst = engine.adapters.adapters[source_id], engine.adapters.adapters[target_id]
    with torch.no_grad():
        for key, (a, b) in src.views.items():
            dst.views[key][0].copy_(a)
            dst.views[key][1].copy_(b)


@writes(lambda tensors: ("base", list(tensors)))
def rank_set_hf_tensors(engine, tensors: Dict[str, torch.Tensor]) -> None:
    """Write full HF-shaped tensors into this rank's engine memory (checkpoint resume)."""
    slices = hf_parameter_slices(engine.model)
    with torch.no_grad():
        for name, value in tensors.items():
            s = slices[name]
            s.view.copy_(value[s.index].to(s.view.dtype))


@writes(lambda lora_id, *_: ("adapter", lora_id))
def rank_set_adapter_tensors(engine, lora_id: str, peft_names, state: Dict[str, torch.Tensor]) -> None:
    """Write full PEFT-shaped adapter matrices into this rank's slot (checkpoint resume)."""
    slices = adapter_slices(engine, lora_id, peft_names)
    with torch.no_grad():
        for name, s in slices.items():
            s.view.copy_(state[name][s.index].to(s.view.dtype))
