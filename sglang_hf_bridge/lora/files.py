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
    try:
        with open(config_file) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:  # not JSON (or not text): name the file
        raise AdapterFileError(f"cannot read {config_file}: {e}") from e
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{config_file} must hold a JSON object, got a JSON {type(raw).__name__}")
    if raw.get("peft_type") not in (None, "LORA"):
        raise UnsupportedAdapterError(f"only LoRA adapters are supported, got peft_type={raw.get('peft_type')!r}")
    try:
        config = LoraConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - name the file
        raise AdapterFileError(f"cannot read {config_file}: {e}") from e
    safe, binary = os.path.join(path, SAFE_NAME), os.path.join(path, BIN_NAME)
    if os.path.isfile(safe):
        from safetensors.torch import load_file

        weights_file, load = safe, load_file
    elif os.path.isfile(binary):
        weights_file, load = binary, lambda f: torch.load(f, map_location="cpu", weights_only=True)
    else:
        raise AdapterFileError(f"{path!r} has no {SAFE_NAME} or {BIN_NAME}")
    try:
        state = load(weights_file)
    except Exception as e:  # noqa: BLE001 - empty, truncated or corrupt: name the file
        raise AdapterFileError(f"cannot read {weights_file} (empty, truncated or corrupt?): {e}") from e
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise AdapterFileError(f"{weights_file} does not hold a dict of tensors")
    return config, state


def write_adapter_dir(path, config, state: Dict[str, torch.Tensor]) -> None:
    """Save a PEFT adapter directory atomically: ``path`` holds the old adapter or the new one,
    whole, whatever happens to this process; its other files are kept."""
    from ..atomic_dir import ADAPTER_FILES, replacing_directory

    check_adapter_target(path)
    with replacing_directory(path, replaces=ADAPTER_FILES) as staging:
        write_adapter_files(staging, config, state)


def check_adapter_target(path) -> None:
    if os.path.isfile(path):
        raise AdapterFileError(f"{path!r} is a file, not a directory")


def write_adapter_files(directory: str, config, state: Dict[str, torch.Tensor]) -> None:
    """The adapter's files, written (new files only) into an existing private directory."""
    from safetensors.torch import save_file

    config.save_pretrained(directory)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()},
              os.path.join(directory, SAFE_NAME), metadata={"format": "pt"})
