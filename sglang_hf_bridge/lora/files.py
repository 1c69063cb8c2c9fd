"""Reading and writing PEFT adapter directories (adapter_config.json + adapter_model.*),
without running code from them: safetensors first, ``.bin`` only with ``weights_only=True``."""

from __future__ import annotations

import json
import os
from typing import Dict, Tuple

import torch

from ..errors import AdapterFileError, UnsupportedAdapterError

CONFIG_NAME = "adapter_config.json"
SAFE_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"


def read_adapter_dir(path) -> Tuple[object, Dict[str, torch.Tensor]]:
    """Return ``(peft.LoraConfig, state_dict)`` of a local PEFT adapter directory."""
    from peft import LoraConfig

    if not isinstance(path, (str, os.PathLike)):
        raise AdapterFileError(f"adapter path must be a local directory, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise AdapterFileError(f"adapter directory {path!r} does not exist or is not a directory")
    config_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_file):
        raise AdapterFileError(f"{path!r} has no {CONFIG_NAME}: not a PEFT adapter directory")
    with open(config_file) as f:
        raw = json.load(f)
    if raw.get("peft_type") not in (None, "LORA"):
        raise UnsupportedAdapterError(f"only LoRA adapters are supported, got peft_type={raw.get('peft_type')!r}")
    try:
        config = LoraConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - name the file
        raise AdapterFileError(f"cannot read {config_file}: {e}") from e
    safe, binary = os.path.join(path, SAFE_NAME), os.path.join(path, BIN_NAME)
    if os.path.isfile(safe):
        from safetensors.torch import load_file

        state = load_file(safe)
    elif os.path.isfile(binary):
        state = torch.load(binary, map_location="cpu", weights_only=True)
    else:
        raise AdapterFileError(f"{path!r} has no {SAFE_NAME} or {BIN_NAME}")
    return config, state


def write_adapter_dir(path, config, state: Dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    if os.path.isfile(path):
        raise AdapterFileError(f"{path!r} is a file, not a directory")
    os.makedirs(path, exist_ok=True)
    config.save_pretrained(path)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()},
              os.path.join(path, SAFE_NAME), metadata={"format": "pt"})
