"""HF-named views of the engine's weights and adapter matrices, and in-place ZO operations on them.

Every HF parameter (``roberta.encoder.layer.0.attention.self.query.weight``, PEFT's
``...query.lora_A.weight``) maps to a view of this rank's engine memory plus the index of that
view inside the full HF-shaped tensor. Random directions ``z`` are drawn per HF name from
``(seed, name)`` at full HF shape and sliced per rank, so a trajectory does not depend on fused
layouts or on ``tp_size``. The operations are plain functions of a runtime so tensor-parallel
ranks can run them in lockstep (``TensorParallelRuntime.run_on_all_ranks``).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from ..sglang_models.roberta_mlm import engine_to_checkpoint_names
from .versions import writes
from .directions import NamedSlice, add_scaled_directions, zo_update


def _tp():
    from sglang.srt.runtime_context import get_parallel

    p = get_parallel()
    return p.tp_rank, p.tp_size


def hf_parameter_slices(model) -> Dict[str, NamedSlice]:
    """HF name -> slice of this rank's engine parameter (views: in-place changes are live)."""
    config = model.config
    rank, tp = _tp()
    H, I, V = config.hidden_size, config.intermediate_size, config.vocab_size
    out: Dict[str, NamedSlice] = {}
    for engine_name, param in model.named_parameters():
        for ckpt_name, shard in engine_to_checkpoint_names(engine_name):
            full = ckpt_name if ckpt_name.startswith("lm_head.") else "roberta." + ckpt_name
            if full == "lm_head.decoder.bias" or (full == "lm_head.decoder.weight" and engine_name != "lm_head.decoder.weight"):
                continue
            data = param.data
            if shard is not None:  # fused qkv: [q_r; k_r; v_r]
                local = data.shape[0] // 3
                i = "qkv".index(shard)
                view = data[i * local : (i + 1) * local]
                index = (slice(rank * local, (rank + 1) * local),)
                shape = (H,) + tuple(data.shape[1:])
            elif engine_name.endswith(("word_embeddings.weight", "lm_head.bias", "lm_head.decoder.weight")):
                start, end = _vocab_range(model, engine_name)
                view = data[: end - start]
                index = (slice(start, end),)
                shape = (V,) + tuple(data.shape[1:])
            elif engine_name.endswith(("fc_in.weight", "fc_in.bias")):
                view, index, shape = data, (slice(rank * data.shape[0], (rank + 1) * data.shape[0]),), (I,) + tuple(data.shape[1:])
            elif engine_name.endswith(("o_proj.weight", "down_proj.weight")):
                cols = data.shape[1]
                view, index = data, (slice(None), slice(rank * cols, (rank + 1) * cols))
                shape = (data.shape[0], cols * tp)
            else:
                view, index, shape = data, tuple(slice(None) for _ in data.shape), tuple(data.shape)
            out[full] = NamedSlice(full, shape, view, index)
    return out


def _vocab_range(model, engine_name: str) -> Tuple[int, int]:
    emb = model.lm_head.word_embeddings if "lm_head" in engine_name else model.embeddings.word_embeddings
    return emb.shard_indices.org_vocab_start_index, emb.shard_indices.org_vocab_end_index


def adapter_slices(runtime, lora_id: str, peft_names: Dict[Tuple[int, str, str], str]) -> Dict[str, NamedSlice]:
    """PEFT name -> slice of this rank's LoRA pool slot for one adapter."""
    rank, tp = _tp()
    adapter = runtime.adapters.adapters[lora_id]
    out = {}
    for (layer, module), (a, b) in adapter.views.items():
        if (layer, module, "A") not in peft_names:
            continue  # a zero slice SGLang needs in its fused qkv, not part of the PEFT adapter
        row_parallel = module in ("o_proj", "down_proj")
        for which, view in (("A", a), ("B", b)):
            name = peft_names[(layer, module, which)]
            if which == "A" and row_parallel:
                cols = view.shape[1]
                index, shape = (slice(None), slice(rank * cols, (rank + 1) * cols)), (view.shape[0], cols * tp)
            elif which == "B" and not row_parallel:
                rows = view.shape[0]
                index, shape = (slice(rank * rows, (rank + 1) * rows), slice(None)), (rows * tp, view.shape[1])
            else:
                index, shape = (slice(None), slice(None)), tuple(view.shape)
            out[name] = NamedSlice(name, shape, view, index)
    return out


# --- lockstep entry points (``function(runtime, *args)``) --------------------------------------
@writes(lambda names, *_: ("base", names))
def rank_perturb_weights(runtime, names: List[str], seed: int, scale: float) -> None:
    add_scaled_directions(hf_parameter_slices(runtime.model), names, seed, scale)


@writes(lambda names, *_: ("base", names))
def rank_update_weights(runtime, names, seed, lr, projected_grad, weight_decay, no_decay, restore=0.0) -> None:
    zo_update(hf_parameter_slices(runtime.model), names, seed, lr, projected_grad, weight_decay, no_decay, restore)


@writes(lambda lora_id, *_: ("adapter", lora_id))
def rank_perturb_adapter(runtime, lora_id: str, peft_names, names, seed: int, scale: float) -> None:
    add_scaled_directions(adapter_slices(runtime, lora_id, peft_names), names, seed, scale)


@writes(lambda lora_id, *_: ("adapter", lora_id))
def rank_update_adapter(runtime, lora_id, peft_names, names, seed, lr, projected_grad, weight_decay, no_decay,
                        restore=0.0) -> None:
    zo_update(adapter_slices(runtime, lora_id, peft_names), names, seed, lr, projected_grad, weight_decay, no_decay,
              restore)


@writes(lambda source_id, target_id: ("adapter", target_id))
def rank_copy_adapter(runtime, source_id: str, target_id: str) -> None:
    """Copy one adapter's matrices into another loaded with the same targets and rank."""
    src, dst = runtime.adapters.adapters[source_id], runtime.adapters.adapters[target_id]
    with torch.no_grad():
        for key, (a, b) in src.views.items():
            dst.views[key][0].copy_(a)
            dst.views[key][1].copy_(b)


@writes(lambda tensors: ("base", list(tensors)))
def rank_set_hf_tensors(runtime, tensors: Dict[str, torch.Tensor]) -> None:
    """Write full HF-shaped tensors into this rank's engine memory (checkpoint resume)."""
    slices = hf_parameter_slices(runtime.model)
    with torch.no_grad():
        for name, value in tensors.items():
            s = slices[name]
            s.view.copy_(value[s.index].to(s.view.dtype))


@writes(lambda lora_id, *_: ("adapter", lora_id))
def rank_set_adapter_tensors(runtime, lora_id: str, peft_names, state: Dict[str, torch.Tensor]) -> None:
    """Write full PEFT-shaped adapter matrices into this rank's slot (checkpoint resume)."""
    slices = adapter_slices(runtime, lora_id, peft_names)
    with torch.no_grad():
        for name, s in slices.items():
            s.view.copy_(state[name][s.index].to(s.view.dtype))
