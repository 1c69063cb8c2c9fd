"""The table between PEFT's names for encoder modules and the engine's LoRA targets, per family.

PEFT names a module by its path in the HF model: ``roberta.encoder.layer.N.attention.self.query``
for RoBERTa-family models, ``bert.encoder.layer.N...`` for BERT, ``model.layers.N.attn.Wqkv`` for
ModernBERT (the family's weight map declares its base prefix, layer prefix and LoRA modules:
``WeightMap.lora_modules``). Functions take the model's config; without one they read RoBERTa's
names (the RoBERTa and BERT families share theirs).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

from ..sglang_models.weight_map import LORA_MODULES, ROBERTA, WeightMap, weight_map_for

# HF module (relative to ``<prefix>.encoder.layer.N.``) -> engine module (RoBERTa / BERT)
ADAPTABLE_MODULES = {hf: engine for engine, hf in LORA_MODULES.items()}
ENGINE_TO_HF = dict(LORA_MODULES)


def _names(config) -> WeightMap:
    """A config's family names (a WeightMap passes through; None: RoBERTa's)."""
    if config is None:
        return ROBERTA
    return config if isinstance(config, WeightMap) else weight_map_for(config)


@lru_cache(maxsize=None)
def _patterns(names: WeightMap) -> Tuple["re.Pattern[str]", "re.Pattern[str]", Dict[str, str]]:
    prefixes = "|".join(re.escape(p[:-1]) for p in names.accepted_prefixes)
    layers = re.escape(names.layer_prefix)
    peft_key = re.compile(rf"^(?:base_model\.model\.)?(?:(?:{prefixes})\.)?{layers}\.(\d+)\.(.+)\.lora_([AB])"
                          r"(?:\.[^.]+)?\.weight$")
    hf_module = re.compile(rf"^(?:(?:{prefixes})\.)?{layers}\.(\d+)\.(.+)$")
    return peft_key, hf_module, {hf: engine for engine, hf in names.lora_modules}


def hf_prefix(config) -> str:
    """The base-model prefix transformers' class for ``config`` uses (``roberta`` / ``bert`` / ``model``)."""
    return weight_map_for(config).hf_prefix


def hf_module_names(config, head: Optional[str] = None) -> List[str]:
    """Every module of the HF model (masked LM, or the class of ``head``) a PEFT config could name
    as a LoRA target."""
    names = weight_map_for(config, head)
    under = (lambda m: f"{names.hf_prefix}.{m}") if names.hf_prefix else (lambda m: m)  # noqa: E731
    out = []
    for i in range(config.num_hidden_layers):
        out += [under(f"{names.layer_prefix}.{i}.{hf}") for _, hf in names.lora_modules]
    # the embeddings (LoRA on them is refused as not runnable, never dropped)
    out += [under(c.rsplit(".", 1)[0]) for c, e, _ in names.encoder_rows
            if e.startswith("embeddings.") and c.endswith(".weight") and "norm" not in c.lower()]
    # the head's linear modules (likewise refused)
    out += sorted({names.to_hf_name(c).rsplit(".", 1)[0] for c, e, _ in names.rows
                   if not e.startswith(("embeddings.", "layers.", "final_norm.")) and c.endswith(".weight")
                   and "norm" not in c.lower()})
    return out


def hf_module_to_engine(name: str, config=None) -> Optional[Tuple[int, str]]:
    """``roberta.encoder.layer.4.attention.self.value`` -> ``(4, "v_proj")``; None for a module
    the engine cannot adapt."""
    _, hf_module, table = _patterns(_names(config))
    m = hf_module.match(name)
    if m and m.group(2) in table:
        return int(m.group(1)), table[m.group(2)]
    return None


def peft_key_to_engine(key: str, config=None) -> Tuple[int, str, str]:
    """``base_model.model.roberta.encoder.layer.3.attention.self.query.lora_A.weight`` ->
    ``(3, "q_proj", "A")``. Raises KeyError for keys that are not adaptable LoRA matrices."""
    peft_key, _, table = _patterns(_names(config))
    m = peft_key.match(key)
    if not m or m.group(2) not in table:
        raise KeyError(key)
    return int(m.group(1)), table[m.group(2)], m.group(3)


def engine_key_to_peft(layer: int, module: str, which: str, prefix: str = ROBERTA.hf_prefix, config=None) -> str:
    """The key PEFT's ``save_pretrained`` writes (adapter name removed) for a model whose base
    prefix is ``prefix`` (see :func:`hf_prefix`; "" for a base-model class)."""
    names = _names(config)
    under = f"{prefix}." if prefix else ""
    hf = dict(names.lora_modules)[module]
    return f"base_model.model.{under}{names.layer_prefix}.{layer}.{hf}.lora_{which}.weight"
