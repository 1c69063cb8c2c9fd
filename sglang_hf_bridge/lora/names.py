"""The table between PEFT's names for encoder modules and the engine's LoRA targets.

PEFT names a module by its path in the HF model: ``roberta.encoder.layer.N.attention.self.query``
for RoBERTa-family models, ``bert.encoder.layer.N...`` for BERT (the family's ``hf_prefix`` in
the weight map); the module names under ``encoder.layer.N.`` are the same for both.
"""

from __future__ import annotations

import re
from typing import List, Optional, Tuple

from ..sglang_models.weight_map import BASE_MODEL_PREFIXES, LORA_MODULES, ROBERTA, weight_map_for

# HF module (relative to ``<prefix>.encoder.layer.N.``) -> engine module
ADAPTABLE_MODULES = {hf: engine for engine, hf in LORA_MODULES.items()}
ENGINE_TO_HF = dict(LORA_MODULES)
_PREFIXES = "|".join(re.escape(p[:-1]) for p in BASE_MODEL_PREFIXES)

_PEFT_KEY = re.compile(
    rf"^(?:base_model\.model\.)?(?:(?:{_PREFIXES})\.)?"
    r"encoder\.layer\.(\d+)\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$"
)
_HF_MODULE = re.compile(rf"^(?:{_PREFIXES})\.encoder\.layer\.(\d+)\.(.+)$")


def hf_prefix(config) -> str:
    """The base-model prefix transformers' class for ``config`` uses (``roberta`` / ``bert``)."""
    return weight_map_for(config).hf_prefix


def hf_module_names(config, head: Optional[str] = None) -> List[str]:
    """Every module of the HF model (masked LM, or the class of ``head``) a PEFT config could name
    as a LoRA target."""
    names = weight_map_for(config, head)
    under = (lambda m: f"{names.hf_prefix}.{m}") if names.hf_prefix else (lambda m: m)  # noqa: E731
    out = []
    for i in range(config.num_hidden_layers):
        out += [under(f"encoder.layer.{i}.{m}") for m in ADAPTABLE_MODULES]
    out += [under("embeddings.word_embeddings"), under("embeddings.position_embeddings"),
            under("embeddings.token_type_embeddings")]
    # the head's linear modules (LoRA on them is refused as not runnable, never dropped)
    out += sorted({names.to_hf_name(c).rsplit(".", 1)[0] for c, e, _ in names.rows
                   if not e.startswith(("embeddings.", "layers.")) and c.endswith(".weight")
                   and "layer_norm" not in c and "LayerNorm" not in c})
    return out


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


def engine_key_to_peft(layer: int, module: str, which: str, prefix: str = ROBERTA.hf_prefix) -> str:
    """The key PEFT's ``save_pretrained`` writes (adapter name removed) for a model whose base
    prefix is ``prefix`` (see :func:`hf_prefix`)."""
    under = f"{prefix}." if prefix else ""
    return f"base_model.model.{under}encoder.layer.{layer}.{ENGINE_TO_HF[module]}.lora_{which}.weight"
