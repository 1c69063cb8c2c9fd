"""The RoBERTa-family weight map: checkpoint names <-> engine parameters, and how each engine
parameter is split over tensor-parallel ranks. Pure tables (no SGLang import), the one source
for the loader, the saver, MeZO's HF-named views, TP gathers and the LoRA side.

Engine parameters are those of :mod:`sglang_hf_bridge.sglang_models.roberta_mlm`:
``layers.N.self_attn.qkv_proj`` (fused q/k/v), ``o_proj``, ``mlp.fc_in``, ``mlp.down_proj``...
"""

from __future__ import annotations

import functools
import re
from typing import List, Optional, Tuple

# The prefix transformers' RobertaForMaskedLM puts before encoder names (what we save and
# what PEFT adapters name); checkpoints of the same architecture may carry any of these.
HF_BASE_PREFIX = "roberta"
BASE_MODEL_PREFIXES = ("roberta.", "camembert.", "xlm_roberta.")

# HF checkpoint name (without the base prefix) -> engine name, q/k/v shard id of the fused qkv.
# ``{i}`` is the layer index.
CHECKPOINT_TO_ENGINE: List[Tuple[str, str, Optional[str]]] = [
    ("embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight", None),
    ("embeddings.position_embeddings.weight", "embeddings.position_embeddings.weight", None),
    ("embeddings.token_type_embeddings.weight", "embeddings.token_type_embeddings.weight", None),
    ("embeddings.LayerNorm.weight", "embeddings.layer_norm.weight", None),
    ("embeddings.LayerNorm.bias", "embeddings.layer_norm.bias", None),
    ("encoder.layer.{i}.attention.self.query.weight", "layers.{i}.self_attn.qkv_proj.weight", "q"),
    ("encoder.layer.{i}.attention.self.query.bias", "layers.{i}.self_attn.qkv_proj.bias", "q"),
    ("encoder.layer.{i}.attention.self.key.weight", "layers.{i}.self_attn.qkv_proj.weight", "k"),
    ("encoder.layer.{i}.attention.self.key.bias", "layers.{i}.self_attn.qkv_proj.bias", "k"),
    ("encoder.layer.{i}.attention.self.value.weight", "layers.{i}.self_attn.qkv_proj.weight", "v"),
    ("encoder.layer.{i}.attention.self.value.bias", "layers.{i}.self_attn.qkv_proj.bias", "v"),
    ("encoder.layer.{i}.attention.output.dense.weight", "layers.{i}.self_attn.o_proj.weight", None),
    ("encoder.layer.{i}.attention.output.dense.bias", "layers.{i}.self_attn.o_proj.bias", None),
    ("encoder.layer.{i}.attention.output.LayerNorm.weight", "layers.{i}.attn_norm.weight", None),
    ("encoder.layer.{i}.attention.output.LayerNorm.bias", "layers.{i}.attn_norm.bias", None),
    ("encoder.layer.{i}.intermediate.dense.weight", "layers.{i}.mlp.fc_in.weight", None),
    ("encoder.layer.{i}.intermediate.dense.bias", "layers.{i}.mlp.fc_in.bias", None),
    ("encoder.layer.{i}.output.dense.weight", "layers.{i}.mlp.down_proj.weight", None),
    ("encoder.layer.{i}.output.dense.bias", "layers.{i}.mlp.down_proj.bias", None),
    ("encoder.layer.{i}.output.LayerNorm.weight", "layers.{i}.ffn_norm.weight", None),
    ("encoder.layer.{i}.output.LayerNorm.bias", "layers.{i}.ffn_norm.bias", None),
    ("lm_head.dense.weight", "lm_head.dense.weight", None),
    ("lm_head.dense.bias", "lm_head.dense.bias", None),
    ("lm_head.layer_norm.weight", "lm_head.layer_norm.weight", None),
    ("lm_head.layer_norm.bias", "lm_head.layer_norm.bias", None),
    ("lm_head.bias", "lm_head.bias", None),
    # Only for checkpoints with tie_word_embeddings=False: the engine model then owns a decoder,
    # and HF's forward uses decoder.bias (not lm_head.bias) -- see the model's load_weights.
    ("lm_head.decoder.weight", "lm_head.decoder.weight", None),
    ("lm_head.decoder.bias", "lm_head.bias", None),
]

# Checkpoint names that are accepted and deliberately not loaded.
IGNORED_CHECKPOINT_NAMES = (re.compile(r"^embeddings\.position_ids$"), re.compile(r"^pooler\."))

# How SGLang splits each engine parameter over TP ranks (by name suffix; anything else is
# replicated): "dim0" = output rows (column-parallel linear), "dim1" = input columns
# (row-parallel linear), "qkv" = [q_r; k_r; v_r] per rank, "vocab" = rows of the padded
# vocabulary (VocabParallelEmbedding).
SHARD_RULES = (
    ("qkv_proj.weight", "qkv"),
    ("qkv_proj.bias", "qkv"),
    ("o_proj.weight", "dim1"),
    ("fc_in.weight", "dim0"),
    ("fc_in.bias", "dim0"),
    ("down_proj.weight", "dim1"),
    ("word_embeddings.weight", "vocab"),
    ("lm_head.bias", "vocab"),
    ("lm_head.decoder.weight", "vocab"),
)
QKV_SHARDS = ("q", "k", "v")

# Engine modules LoRA can target, and the HF module (under ``encoder.layer.N.``) each stands for.
LORA_MODULES = {
    "q_proj": "attention.self.query",
    "k_proj": "attention.self.key",
    "v_proj": "attention.self.value",
    "o_proj": "attention.output.dense",
    "fc_in": "intermediate.dense",
    "down_proj": "output.dense",
}


def module_dims(config, module: str) -> Tuple[int, int]:
    """(in, out) features of a LoRA-targetable engine module."""
    h, i = config.hidden_size, config.intermediate_size
    return {"fc_in": (h, i), "down_proj": (i, h)}.get(module, (h, h))


# LoRA targets whose base layer is row-parallel: their A is split by columns, B replicated.
LORA_ROW_PARALLEL = frozenset(m for m in LORA_MODULES if dict(SHARD_RULES).get(f"{m}.weight") == "dim1")


def _pattern(template: str) -> "re.Pattern[str]":
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


_FORWARD = [(_pattern(ckpt), engine, shard) for ckpt, engine, shard in CHECKPOINT_TO_ENGINE]
_REVERSE = [(_pattern(engine), ckpt, shard) for ckpt, engine, shard in CHECKPOINT_TO_ENGINE]


def strip_base_prefix(name: str) -> str:
    for prefix in BASE_MODEL_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def to_hf_name(checkpoint_name: str) -> str:
    """A table name as transformers' RobertaForMaskedLM writes it (``roberta.`` prefix)."""
    return checkpoint_name if checkpoint_name.startswith("lm_head.") else f"{HF_BASE_PREFIX}.{checkpoint_name}"


def checkpoint_to_engine_name(name: str) -> Optional[Tuple[str, Optional[str]]]:
    """Map one HF checkpoint tensor name to ``(engine_name, shard_id)``; None if ignored.

    Raises KeyError for a name that is neither mapped nor deliberately ignored, so unexpected
    tensors are never dropped silently.
    """
    name = strip_base_prefix(name)
    if any(p.match(name) for p in IGNORED_CHECKPOINT_NAMES):
        return None
    for pattern, engine, shard in _FORWARD:
        m = pattern.match(name)
        if m:
            return engine.format(i=m.groupdict().get("i")), shard
    raise KeyError(name)


@functools.lru_cache(maxsize=None)
def engine_to_checkpoint_names(engine_name: str) -> Tuple[Tuple[str, Optional[str]], ...]:
    """Inverse of the table: the checkpoint names (without base prefix) that fill ``engine_name``."""
    out = []
    for pattern, ckpt, shard in _REVERSE:
        m = pattern.match(engine_name)
        if m:
            out.append((ckpt.format(i=m.groupdict().get("i")), shard))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def shard_rule(engine_name: str) -> Optional[str]:
    """How ``engine_name`` is split over TP ranks (see :data:`SHARD_RULES`); None = replicated."""
    for suffix, rule in SHARD_RULES:
        if engine_name.endswith(suffix):
            return rule
    return None
