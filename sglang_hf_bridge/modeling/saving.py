"""Engine weights -> an HF masked-LM checkpoint, through the SGLang model's name table."""

from __future__ import annotations

import os
from typing import Dict

import torch

from ..sglang_models.roberta_mlm import engine_to_checkpoint_names
from .checkpoint import SUPPORTED_MODEL_TYPES, write_safetensors


def engine_parameters(runtime) -> Dict[str, torch.Tensor]:
    """Full (unsharded) engine parameters: gathered from every rank under tensor parallelism."""
    if hasattr(runtime, "rank_parameters"):
        from ..engine.tp_shards import merge_parameters

        return merge_parameters(runtime.rank_parameters())
    return dict(runtime.model.named_parameters())


def engine_state_dict(params: Dict[str, torch.Tensor], config) -> Dict[str, torch.Tensor]:
    """HF-named tensors (``roberta.`` prefix, q/k/v unfused) copied from the engine's weights."""
    state: Dict[str, torch.Tensor] = {}
    H = config.hidden_size
    for engine_name, param in params.items():
        targets = engine_to_checkpoint_names(engine_name)
        if not targets:
            continue
        tensor = param.detach().to("cpu")
        if engine_name in ("embeddings.word_embeddings.weight", "lm_head.decoder.weight", "lm_head.bias"):
            tensor = tensor[: config.vocab_size]
        for ckpt_name, shard in targets:
            value = tensor
            if shard is not None:
                offset = {"q": 0, "k": 1, "v": 2}[shard] * H
                value = tensor[offset : offset + H]
            full = ckpt_name if ckpt_name.startswith("lm_head.") else "roberta." + ckpt_name
            if full == "lm_head.decoder.bias" and getattr(config, "tie_word_embeddings", True):
                continue  # tied to lm_head.bias; HF does not store it
            state[full] = value.clone()
    return state


def save_engine_checkpoint(model, save_directory) -> None:
    if os.path.isfile(save_directory):
        raise ValueError(f"save_directory {save_directory!r} is a file, not a directory")
    params = engine_parameters(model.runtime)
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.architectures = [SUPPORTED_MODEL_TYPES[config.model_type]]
    config.dtype = str(model.dtype).replace("torch.", "")
    write_safetensors(engine_state_dict(params, config), save_directory, config)
