"""Where a checkpoint or an adapter named by a path or a Hub id lives on this machine.

Resolved as transformers resolves models and PEFT resolves adapters: an existing local directory is
used as it is; anything else is a Hugging Face Hub id, looked up through transformers'
``cached_file`` (huggingface_hub's cache: ``cache_dir=``, ``revision=``, ``subfolder=``, ``token=``,
``local_files_only=``, ``HF_HUB_OFFLINE``), fetching only the files loading reads. Every file of one
revision lands in the same ``snapshots/<commit>/`` directory, so the rest of the library (and every
tensor-parallel rank) reads that one resolved snapshot like a local checkpoint.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

from .checkpoint import WEIGHT_FILES, index_shards, weight_formats
from .errors import AdapterFileError, CheckpointError, CheckpointNotFoundError

# from_pretrained keywords that steer the Hub look-up (``use_auth_token`` is the old ``token``).
HUB_OPTIONS = ("cache_dir", "revision", "token", "use_auth_token", "local_files_only", "force_download", "proxies")
# Read only for the mask token id (parsed as JSON/text, never instantiated).
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "vocab.json", "vocab.txt")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def hub_options(options: Dict[str, Any]) -> Dict[str, Any]:
    """The Hub look-up keywords among ``options`` (``use_auth_token`` renamed ``token``)."""
    out = {k: options[k] for k in HUB_OPTIONS if options.get(k) is not None}
    if "use_auth_token" in out:
        out.setdefault("token", out.pop("use_auth_token"))
        out.pop("use_auth_token", None)
    return out


def _cached(repo_id: str, filename: str, required: bool, subfolder: Optional[str], hub: Dict[str, Any]):
    from transformers.utils.hub import cached_file

    return cached_file(repo_id, filename, subfolder=subfolder or "", _raise_exceptions_for_missing_entries=required,
                       _raise_exceptions_for_connection_errors=required, **hub)


def _local_or_hub(name_or_path, what: str, error, not_found) -> Optional[str]:
    """The local path of ``name_or_path`` when it is a local directory, None when it must be a Hub id.
    A path no Hub id can look like (absolute, ``./``, ``~``, several ``/``) that does not exist is
    reported as such, not as a malformed id."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise error(f"{what} must be a local directory or a Hugging Face Hub id, got {type(name_or_path).__name__}")
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise error(f"{what} {path!r} is not a directory")
    if os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path:
        raise not_found(f"{what} {path!r} does not exist (and it is not the form of a Hub id, 'org/name')")
    return None


def resolve_model_directory(name_or_path, subfolder: Optional[str] = None, use_safetensors: Optional[bool] = None,
                            **hub: Any) -> str:
    """The local directory of a model checkpoint: ``name_or_path`` (+ ``subfolder``) when it is a local
    directory, else the cached snapshot of the Hub id, with its config, its weights (in transformers'
    order: safetensors unless ``use_safetensors=False``, sharded or not) and its tokenizer files."""
    local = _local_or_hub(name_or_path, "checkpoint path", CheckpointError, CheckpointNotFoundError)
    if local is not None:
        return os.path.join(local, subfolder) if subfolder else local
    repo_id = os.fspath(name_or_path)
    try:
        config_file = _cached(repo_id, "config.json", True, subfolder, hub)
    except OSError as e:
        raise CheckpointNotFoundError(
            f"{repo_id!r} is not a local directory, and as a Hugging Face Hub id it cannot be resolved: {e}") from e
    if config_file is None:
        raise CheckpointNotFoundError(f"Hub model {repo_id!r} has no config.json" +
                                      (f" in subfolder {subfolder!r}" if subfolder else ""))
    try:
        for fmt in weight_formats(use_safetensors):
            index_name, single = WEIGHT_FILES[fmt]
            index = _cached(repo_id, index_name, False, subfolder, hub)
            if index is not None:
                for shard in index_shards(index):
                    _cached(repo_id, shard, True, subfolder, hub)
                break
            if _cached(repo_id, single, False, subfolder, hub) is not None:
                break
        for name in TOKENIZER_FILES:
            _cached(repo_id, name, False, subfolder, hub)
    except OSError as e:  # CheckpointErrors (a bad index) pass as they are
        raise CheckpointNotFoundError(f"cannot fetch the weights of Hub model {repo_id!r}: {e}") from e
    return os.path.dirname(config_file)


def resolve_adapter_directory(name_or_path, subfolder: Optional[str] = None, **hub: Any) -> str:
    """The local directory of a PEFT adapter: a local directory as it is, else the cached snapshot of
    the Hub id (``adapter_config.json`` and ``adapter_model.safetensors``, else ``.bin``, as PEFT)."""
    local = _local_or_hub(name_or_path, "adapter path", AdapterFileError, AdapterFileError)
    if local is not None:
        return os.path.join(local, subfolder) if subfolder else local
    repo_id = os.fspath(name_or_path)
    try:
        config_file = _cached(repo_id, ADAPTER_CONFIG, True, subfolder, hub)
        if config_file is None:
            raise OSError(f"no {ADAPTER_CONFIG}")
        for name in ADAPTER_WEIGHTS:
            if _cached(repo_id, name, False, subfolder, hub) is not None:
                break
    except OSError as e:
        raise AdapterFileError(
            f"{repo_id!r} is not a local adapter directory, and as a Hugging Face Hub id it cannot be resolved: "
            f"{e}") from e
    return os.path.dirname(config_file)
