"""Engine weights -> an HF checkpoint of the model's class, through the weight map's name table."""

from __future__ import annotations

import os
from typing import Dict, Optional

import torch

from ..atomic_dir import ADAPTER_FILES, MODEL_FILES, replacing_directory
from ..checkpoint import SUPPORTED_MODEL_TYPES, write_safetensors
from ..lora.files import check_adapter_target, write_adapter_files
from ..sglang_models.families import ties_word_embeddings
from ..sglang_models.weight_map import weight_map_for


def engine_state_dict(params: Dict[str, torch.Tensor], layouts, config, head: str) -> Dict[str, torch.Tensor]:
    """HF-named tensors (the family's base prefix, q/k/v unfused, the ``head``'s names) copied from
    whole engine weights (:meth:`EncoderRuntime.full_parameters`: padding already removed)."""
    state: Dict[str, torch.Tensor] = {}
    names = weight_map_for(config, head)
    duplicates = names.saved_duplicates(ties_word_embeddings(config))
    for engine_name, param in params.items():
        tensor = param.detach().to("cpu")
        for ckpt_name, part in names.engine_to_checkpoint_names(engine_name):
            if ckpt_name in duplicates:
                continue  # tied to another saved tensor; HF does not store it
            state[names.to_hf_name(ckpt_name)] = layouts[engine_name].part_of(tensor, part).clone()
    return state


def save_engine_checkpoint(model, save_directory) -> None:
    """The engine's weights as an HF checkpoint, saved atomically: ``save_directory`` holds the
    old checkpoint or the new one, whole, at every instant (see ``atomic_dir``); its other files
    (tokenizer, trainer state, ``checkpoint-*/``) are kept, a previous save's weights are not."""
    _check_model_target(save_directory)
    with replacing_directory(save_directory, replaces=MODEL_FILES) as staging:
        write_engine_checkpoint(model, staging)


def save_adapter_and_base(model, save_directory, adapter_name: Optional[str]) -> None:
    """An adapter (PEFT format) and the base checkpoint in one directory, swapped in together."""
    check_adapter_target(save_directory)
    with replacing_directory(save_directory, replaces=ADAPTER_FILES + MODEL_FILES) as staging:
        write_adapter_files(staging, *model._adapter_for_saving(adapter_name))
        write_engine_checkpoint(model, staging)


def _check_model_target(save_directory) -> None:
    if os.path.isfile(save_directory):
        raise ValueError(f"save_directory {save_directory!r} is a file, not a directory")


def write_engine_checkpoint(model, directory: str) -> None:
    """The checkpoint's files, written (new files only) into an existing private directory."""
    params = model.runtime.full_parameters()
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.architectures = [model.hf_model_class or SUPPORTED_MODEL_TYPES[config.model_type]]
    config.dtype = str(model.dtype).replace("torch.", "")
    state = engine_state_dict(params, model.runtime.model.layouts, config, model.head_spec.name)
    write_safetensors(state, directory, config)
