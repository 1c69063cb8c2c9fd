"""Engine weights -> an HF masked-LM checkpoint, through the weight map's name table."""

from __future__ import annotations

import os
from typing import Dict

import torch

from ..checkpoint import SUPPORTED_MODEL_TYPES, write_safetensors
from ..sglang_models.weight_map import QKV_SHARDS, ffn_padded_dim, shard_rule, weight_map_for


def engine_state_dict(params: Dict[str, torch.Tensor], config) -> Dict[str, torch.Tensor]:
    """HF-named tensors (the family's base prefix, q/k/v unfused, SGLang's padding of the
    vocabulary and the FFN removed) copied from full engine weights."""
    state: Dict[str, torch.Tensor] = {}
    H = config.hidden_size
    names = weight_map_for(config)
    duplicates = names.saved_duplicates(getattr(config, "tie_word_embeddings", True))
    for engine_name, param in params.items():
        tensor = param.detach().to("cpu")
        if shard_rule(engine_name) == "vocab":
            tensor = tensor[: config.vocab_size]
        ffn_dim = ffn_padded_dim(engine_name)
        if ffn_dim is not None:
            tensor = tensor.narrow(ffn_dim, 0, config.intermediate_size)  # the HF config's (real) size
        for ckpt_name, shard in names.engine_to_checkpoint_names(engine_name):
            if ckpt_name in duplicates:
                continue  # tied to another saved tensor; HF does not store it
            value = tensor
            if shard is not None:
                offset = QKV_SHARDS.index(shard) * H
                value = tensor[offset : offset + H]
            state[names.to_hf_name(ckpt_name)] = value.clone()
    return state


def save_engine_checkpoint(model, save_directory) -> None:
    if os.path.isfile(save_directory):
        raise ValueError(f"save_directory {save_directory!r} is a file, not a directory")
    params = model.runtime.full_parameters()
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.architectures = [SUPPORTED_MODEL_TYPES[config.model_type]]
    config.dtype = str(model.dtype).replace("torch.", "")
    write_safetensors(engine_state_dict(params, config), save_directory, config)
