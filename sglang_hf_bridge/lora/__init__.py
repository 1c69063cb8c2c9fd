"""PEFT LoRA adapters on the engine: config checks, PEFT <-> engine names, adapter files."""

from .config import AdapterSpec, UnsupportedAdapterError, resolve_adapter_spec
from .names import ADAPTABLE_MODULES, engine_key_to_peft, peft_key_to_engine

__all__ = [
    "AdapterSpec",
    "UnsupportedAdapterError",
    "resolve_adapter_spec",
    "ADAPTABLE_MODULES",
    "engine_key_to_peft",
    "peft_key_to_engine",
]
