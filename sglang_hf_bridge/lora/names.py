"""The table between PEFT's names for RoBERTa modules and the engine's LoRA targets."""

from __future__ import annotations

import re
from typing import List, Optional, Tuple

from ..sglang_models.weight_map import BASE_MODEL_PREFIXES, HF_BASE_PREFIX, LORA_MODULES

# HF module (relative to ``roberta.encoder.layer.N.``) -> engine module
ADAPTABLE_MODULES = {hf: engine for engine, hf in LORA_MODULES.items()}
ENGINE_TO_HF = dict(LORA_MODULES)
BASE_PREFIX = HF_BASE_PREFIX

_PEFT_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:(?:" + "|".join(re.escape(p[:-1]) for p in BASE_MODEL_PREFIXES) + r")\.)?"
    r"encoder\.layer\.(\d+)\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$"
)
_HF_MODULE = re.compile(rf"^{BASE_PREFIX}\.encoder\.layer\.(\d+)\.(.+)$")


def hf_module_names(config) -> List[str]:
    """Every module of an HF RoBERTa masked LM a PEFT config could name as a LoRA target."""
    names = []
    for i in range(config.num_hidden_layers):
        names += [f"{BASE_PREFIX}.encoder.layer.{i}.{m}" for m in ADAPTABLE_MODULES]
    names += [f"{BASE_PREFIX}.embeddings.word_embeddings", f"{BASE_PREFIX}.embeddings.position_embeddings",
              f"{BASE_PREFIX}.embeddings.token_type_embeddings", "lm_head.dense", "lm_head.decoder"]
    return names


def hf_module_to_engine(name: str) -> Optional[Tuple[int, str]]:
    m = _HF_MODULE.match(name)
    if m and m.group(2) in ADAPTABLE_MODULES:
        return int(m.group(1)), ADAPTABLE_MODULES[m.group(2)]
    return None


def peft_key_to_engine(key: str) -> Tuple[int, str, str]:
    """``base_model.model.roberta.encoder.layer.3.attention.self.query.lora_A.weight`` ->
    ``(3, "q_proj", "A")``. Raises KeyError for keys that are not adaptable LoRA matrices."""
    m = _PEFT_KEY.match(key)
    if not m or m.group(2) not in ADAPTABLE_MODULES:
        raise KeyError(key)
    return int(m.group(1)), ADAPTABLE_MODULES[m.group(2)], m.group(3)


def engine_key_to_peft(layer: int, module: str, which: str) -> str:
    """The key PEFT's ``save_pretrained`` writes (adapter name removed)."""
    return f"base_model.model.{BASE_PREFIX}.encoder.layer.{layer}.{ENGINE_TO_HF[module]}.lora_{which}.weight"
