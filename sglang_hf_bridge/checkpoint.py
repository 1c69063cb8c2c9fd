"""Reading and writing HF masked-LM checkpoint directories without running code from them.

safetensors first; ``.bin`` files only through ``torch.load(weights_only=True)``. Paths and
configs are validated before any engine starts. Shared by the face (validation, saving) and the
engine's worker ranks (each reads the checkpoint itself), so it belongs to neither.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Tuple

import torch

from .errors import CheckpointError

SUPPORTED_MODEL_TYPES = {
    "roberta": "RobertaForMaskedLM",
    "xlm-roberta": "XLMRobertaForMaskedLM",
    "camembert": "CamembertForMaskedLM",
}
SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


@dataclass
class CheckpointFiles:
    directory: str
    weight_files: List[str]
    format: str  # "safetensors" | "bin"


def locate_checkpoint(path) -> CheckpointFiles:
    """Validate ``path`` as a local HF checkpoint directory and list its weight files."""
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"checkpoint path must be a local directory path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(
            f"checkpoint directory {path!r} does not exist (this bridge loads local directories only; "
            "download the model with huggingface_hub first)"
        )
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint path {path!r} is not a directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path!r} has no config.json: not a Hugging Face checkpoint")
    for index_name, fmt in ((SAFE_INDEX, "safetensors"), (BIN_INDEX, "bin")):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            files = [os.path.join(path, s) for s in shards]
            for f in files:
                if os.path.dirname(os.path.realpath(f)) != os.path.realpath(path):
                    raise CheckpointError(f"shard {f!r} listed in {index_name} lies outside the checkpoint")
                if not os.path.isfile(f):
                    raise CheckpointError(f"shard {f!r} listed in {index_name} is missing")
            return CheckpointFiles(path, files, fmt)
    for name, fmt in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "bin")):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            return CheckpointFiles(path, [f], fmt)
    raise CheckpointError(
        f"{path!r} has no model.safetensors or pytorch_model.bin (nor a sharded index)"
    )


def validate_masked_lm_config(config) -> None:
    """Raise CheckpointError unless ``config`` is a supported masked-LM config."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"model_type {model_type!r} is not supported; expected one of {sorted(SUPPORTED_MODEL_TYPES)}"
        )
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith("ForMaskedLM") for a in archs):
        raise CheckpointError(
            f"checkpoint architectures {archs} contain no masked-LM head (expected *ForMaskedLM)"
        )


def iter_checkpoint_tensors(files: CheckpointFiles, progress: bool = False) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor, one shard at a time."""
    shards = files.weight_files
    if progress and len(shards) > 1:
        from transformers.utils.logging import tqdm

        shards = tqdm(shards, desc="Loading checkpoint shards")
    for shard in shards:
        if files.format == "safetensors":
            from safetensors import safe_open

            with safe_open(shard, framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
            for name, tensor in state.items():
                yield name, tensor


def checkpoint_tensor_names(files: CheckpointFiles) -> List[str]:
    if files.format == "safetensors":
        from safetensors import safe_open

        names = []
        for shard in files.weight_files:
            with safe_open(shard, framework="pt", device="cpu") as f:
                names.extend(f.keys())
        return names
    return [n for n, _ in iter_checkpoint_tensors(files)]


def require_masked_lm_head(names: List[str], path: str) -> None:
    if not any(n.startswith("lm_head.") for n in names):
        raise CheckpointError(
            f"{path!r} has no lm_head.* tensors: it is an encoder without a masked-LM head"
        )


def write_safetensors(state: Dict[str, torch.Tensor], directory: str, config) -> None:
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(directory, "model.safetensors"),
              metadata={"format": "pt"})
    config.save_pretrained(directory)
