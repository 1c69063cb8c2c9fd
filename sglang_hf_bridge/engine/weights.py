"""HF-named views of the engine's weights and adapter matrices, and in-place ZO operations on them.

Every HF parameter (``roberta.encoder.layer.0.attention.self.query.weight``, PEFT's
``...query.lora_A.weight``) maps to a view of this rank's engine memory plus the index of that
view inside the full HF-shaped tensor, as each parameter's layout (``sglang_models/layout.py``)
places it. Random directions ``z`` are drawn per HF name from ``(seed, name)`` at full HF shape
and sliced per rank, so a trajectory does not depend on fused layouts or on ``tp_size``. The operations are rank
operations (``fn(engine, *args)``) for :meth:`EncoderRuntime.collective_rpc`.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from ..sglang_models.layout import lora_layout
from ..sglang_models.weight_map import ALL_PARTS, LORA_TARGETS, weight_map_for
from .directions import NamedSlice, add_scaled_directions, method_perturb, method_prepare, method_update, zo_update
from .versions import AdapterWrite, BaseWrite, writes


def _tp_rank() -> int:
    from sglang.srt.runtime_context import get_parallel

    return get_parallel().tp_rank


def hf_parameter_slices(model) -> Dict[str, NamedSlice]:
    """HF name -> slice of this rank's engine parameter (views: in-place changes are live), placed
    by the parameter's layout (:mod:`~sglang_hf_bridge.sglang_models.layout`)."""
    rank = _tp_rank()
    names = weight_map_for(model.config)
    duplicates = names.saved_duplicates(tied=True)  # stand for another engine tensor either way
    out: Dict[str, NamedSlice] = {}
    for engine_name, param in model.named_parameters():
        layout = model.layouts[engine_name]
        for ckpt_name, part in names.engine_to_checkpoint_names(engine_name):
            if ckpt_name in duplicates:
                continue
            full = names.to_hf_name(ckpt_name)
            view = layout.local(param.data, rank, part)
            fused = layout.full_shape(param.shape, part)
            out[full] = NamedSlice(full, fused, view, layout.index(rank, view.dim(), part),
                                   hf_shape=(fused[0] * fused[1],) + fused[2:] if part == ALL_PARTS else None)
    return out


def adapter_slices(engine, lora_id: str, peft_names: Dict[tuple, str]) -> Dict[str, NamedSlice]:
    """PEFT name -> slice of this rank's LoRA pool slot for one adapter; with its own head's
    tensors (``peft_names[("head", engine name)]``, whole on every rank) when it has one."""
    adapter = engine.adapters.adapters[lora_id]
    out = {}
    for engine_name, tensor in adapter.head.items():
        name = peft_names.get(("head", engine_name))
        if name is not None:
            out[name] = NamedSlice(name, tuple(tensor.shape), tensor, (slice(None),) * tensor.dim())
    for (layer, module), (a, b) in adapter.views.items():
        if (layer, module, "A") not in peft_names:
            continue  # a zero slice SGLang needs in its fused qkv, not part of the PEFT adapter
        fused = LORA_TARGETS[module].fused
        for which, view in (("A", a), ("B", b)):
            name = peft_names[(layer, module, which)]
            layout = lora_layout(engine.model.layouts, layer, module, which)
            if fused and which == "A":  # [parts, r, in]: every copy of the shared A moves with z [r, in]
                out[name] = NamedSlice(name, tuple(view.shape[1:]), view, (slice(None),) * 2)
            elif fused:  # [parts, rows, r]: z drawn at [parts, all rows, r] (PEFT's [parts * rows, r])
                shape = (view.shape[0], layout.real_size or view.shape[1] * layout.tp_size, view.shape[2])
                out[name] = NamedSlice(name, shape, view, layout.index(engine.rank, 3, ALL_PARTS),
                                       hf_shape=(shape[0] * shape[1], shape[2]))
            else:
                out[name] = NamedSlice(name, layout.full_shape(view.shape), view, layout.index(engine.rank, 2))
    return out


# --- lockstep rank operations (``fn(engine, *args)``) ---------------------------------------------
@writes(lambda names, *_: BaseWrite(names))
def rank_perturb_weights(engine, names: List[str], seed: int, scale: float) -> None:
    add_scaled_directions(hf_parameter_slices(engine.model), names, seed, scale)


@writes(lambda names, *_: BaseWrite(names))
def rank_update_weights(engine, names, seed, lr, projected_grad, weight_decay, no_decay, restore=0.0) -> None:
    zo_update(hf_parameter_slices(engine.model), names, seed, lr, projected_grad, weight_decay, no_decay, restore)


@writes(lambda lora_id, *_: AdapterWrite(lora_id))
def rank_perturb_adapter(engine, lora_id: str, peft_names, names, seed: int, scale: float) -> None:
    add_scaled_directions(adapter_slices(engine, lora_id, peft_names), names, seed, scale)


@writes(lambda lora_id, *_: AdapterWrite(lora_id))
def rank_update_adapter(engine, lora_id, peft_names, names, seed, lr, projected_grad, weight_decay, no_decay,
                        restore=0.0) -> None:
    zo_update(adapter_slices(engine, lora_id, peft_names), names, seed, lr, projected_grad, weight_decay, no_decay,
              restore)


@writes(lambda source_id, target_id: AdapterWrite(target_id))
def rank_copy_adapter(engine, source_id: str, target_id: str) -> None:
    """Copy one adapter's matrices into another loaded with the same targets and rank."""
    src, dst = engine.adapters.adapters[source_id], engine.adapters.adapters[target_id]
    with torch.no_grad():
        for key, (a, b) in src.views.items():
            dst.views[key][0].copy_(a)
            dst.views[key][1].copy_(b)
        for name, tensor in src.head.items():
            dst.head[name].copy_(tensor)


@writes(lambda tensors: BaseWrite(list(tensors)))
def rank_set_hf_tensors(engine, tensors: Dict[str, torch.Tensor]) -> None:
    """Write full HF-shaped tensors into this rank's engine memory (checkpoint resume)."""
    slices = hf_parameter_slices(engine.model)
    with torch.no_grad():
        for name, value in tensors.items():
            s = slices[name]
            s.view.copy_(value.reshape(s.full_shape)[s.index].to(s.view.dtype))


@writes(lambda lora_id, *_: AdapterWrite(lora_id))
def rank_set_adapter_tensors(engine, lora_id: str, peft_names, state: Dict[str, torch.Tensor]) -> None:
    """Write full PEFT-shaped adapter matrices into this rank's slot (checkpoint resume)."""
    slices = adapter_slices(engine, lora_id, peft_names)
    with torch.no_grad():
        for name, s in slices.items():
            s.view.copy_(state[name].reshape(s.full_shape)[s.index].to(s.view.dtype))


# --- any zeroth-order method (training/zo_methods.py): its per-tensor state stays on the rank --------
def _method_store(engine, key: str) -> Dict[str, dict]:
    """This rank's method state for one set of trained tensors (``"base"`` or an adapter id)."""
    stores = engine.__dict__.setdefault("zo_method_state", {})
    return stores.setdefault(key, {})


def _target_slices(engine, lora_id, peft_names):
    if lora_id is None:
        return hf_parameter_slices(engine.model)
    return adapter_slices(engine, lora_id, peft_names)


def _method_write(state_key, lora_id, peft_names, names, *_):
    """What a method's perturb/update writes: the adapter, or the named base weights."""
    return AdapterWrite(lora_id) if lora_id is not None else BaseWrite(names)


@writes(None)
def rank_method_prepare(engine, state_key: str, lora_id, peft_names, names, method) -> None:
    method_prepare(_target_slices(engine, lora_id, peft_names), names, method, _method_store(engine, state_key))


@writes(_method_write)
def rank_method_perturb(engine, state_key: str, lora_id, peft_names, names, seed, scale, method) -> None:
    method_perturb(_target_slices(engine, lora_id, peft_names), names, seed, scale, method,
                   _method_store(engine, state_key))


@writes(_method_write)
def rank_method_update(engine, state_key: str, lora_id, peft_names, names, samples, lr, weight_decay, no_decay,
                       method, restore=None) -> None:
    method_update(_target_slices(engine, lora_id, peft_names), names, samples, lr, weight_decay, no_decay, method,
                  _method_store(engine, state_key), restore)


@writes(None)
def rank_method_state(engine, state_key: str, lora_id, peft_names, whole=()) -> Dict[str, Dict[str, tuple]]:
    """This rank's share of the method state: name -> key -> (tensor copy, index in the full tensor,
    full shape), or index None for a scalar or a key in ``whole`` (the same on every rank)."""
    slices = _target_slices(engine, lora_id, peft_names)
    out = {}
    for name, state in _method_store(engine, state_key).items():
        s = slices[name]
        out[name] = {k: (t.detach().cpu().clone(), s.index if t.dim() and k not in whole else None, s.full_shape)
                     for k, t in state.items()}
    return out


@writes(None)
def rank_set_method_state(engine, state_key: str, lora_id, peft_names, full: Dict[str, Dict[str, torch.Tensor]],
                          whole=()):
    """Restore method state from full tensors (a checkpoint): each rank takes its share."""
    slices = _target_slices(engine, lora_id, peft_names)
    store = _method_store(engine, state_key)
    store.clear()
    for name, state in full.items():
        s = slices[name]
        store[name] = {k: (t.reshape(s.full_shape)[s.index] if t.dim() and k not in whole else t).to(
            s.view.device, s.view.dtype if t.is_floating_point() and t.dim() else t.dtype).clone()
            for k, t in state.items()}
