"""Weight maps: checkpoint names <-> engine parameters for each checkpoint family (RoBERTa /
XLM-R / CamemBERT and BERT share the engine model, each with its own names), how each engine
parameter is split over tensor-parallel ranks, and which dimensions SGLang pads. Pure tables (no
SGLang import), the one source for the loader, the saver, MeZO's HF-named views, TP gathers and
the LoRA side.

Engine parameters are those of :mod:`sglang_hf_bridge.sglang_models.encoder`:
``layers.N.self_attn.qkv_proj`` (fused q/k/v), ``o_proj``, ``mlp.fc_in``, ``mlp.down_proj``...
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

Row = Tuple[str, str, Optional[str]]

def _pattern(template: str) -> "re.Pattern[str]":
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


# Names older checkpoints (TF-converted BERTs) use, renamed on load as transformers renames them.
LEGACY_RENAMES = (("LayerNorm.gamma", "LayerNorm.weight"), ("LayerNorm.beta", "LayerNorm.bias"))


def canonical_name(name: str) -> str:
    for old, new in LEGACY_RENAMES:
        if old in name:
            name = name.replace(old, new)
    return name


# Encoder rows shared by every family: checkpoint name (without the base prefix) -> engine name,
# plus the q/k/v shard id of the fused qkv. ``{i}`` is the layer index.
ENCODER_ROWS: List[Row] = [
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
]


def _head_rows(dense: str, norm: str, bias: str, decoder: str) -> List[Row]:
    """The masked-LM head: dense -> GELU -> LayerNorm -> decoder (tied to the word embeddings
    unless ``tie_word_embeddings=False``) + bias. An untied checkpoint's decoder bias is the
    bias HF's forward uses, so it fills the same engine parameter."""
    return [
        (f"{dense}.weight", "lm_head.dense.weight", None),
        (f"{dense}.bias", "lm_head.dense.bias", None),
        (f"{norm}.weight", "lm_head.layer_norm.weight", None),
        (f"{norm}.bias", "lm_head.layer_norm.bias", None),
        (bias, "lm_head.bias", None),
        (f"{decoder}.weight", "lm_head.decoder.weight", None),
        (f"{decoder}.bias", "lm_head.bias", None),
    ]


# Names transformers' task classes write outside the base model, for every head of every family
# (a checkpoint name starting with one of these is a head tensor, never an encoder one).
TOP_LEVEL_PREFIXES = ("lm_head.", "cls.", "classifier.", "qa_outputs.", "head.", "decoder.")
_POOLER = re.compile(r"^pooler\.")


@dataclass(frozen=True)
class WeightMap:
    """One checkpoint family's names over the shared engine model (a second map, not a second
    engine), for one head (:mod:`.heads`). ``hf_prefix`` is what transformers' class writes before
    encoder names ("" for the base model class itself); ``head_prefixes`` the head's names outside
    the base model. The ``head_dense_module`` / ``head_bias`` / ``head_decoder`` names are the
    masked-LM head's (None for other heads)."""

    family: str
    hf_prefix: str
    accepted_prefixes: Tuple[str, ...]
    head_prefix: str
    head_dense_module: Optional[str]
    head_bias: Optional[str]
    head_decoder: Optional[str]
    rows: Tuple[Row, ...]
    ignored: Tuple["re.Pattern[str]", ...] = (re.compile(r"^embeddings\.position_ids$"), _POOLER)
    head: str = "masked_lm"
    head_prefixes: Tuple[str, ...] = ()
    encoder_rows: Tuple[Row, ...] = tuple(ENCODER_ROWS)  # the base model's rows (other heads reuse them)
    # LoRA: (engine module, HF module under ``{layer_prefix}.N.``) pairs PEFT can target.
    lora_modules: Tuple[Tuple[str, str], ...] = ()
    layer_prefix: str = "encoder.layer"

    @property
    def lora_base_modules(self) -> Tuple[str, ...]:
        """The engine layers SGLang's LoRA manager wraps for this family."""
        return tuple(dict.fromkeys(LORA_TARGETS[m].base for m, _ in self.lora_modules))

    def __post_init__(self) -> None:
        object.__setattr__(self, "_forward", [(_pattern(c), e, s) for c, e, s in self.rows])
        object.__setattr__(self, "_reverse", [(_pattern(e), c, s) for c, e, s in self.rows])
        object.__setattr__(self, "_reverse_cache", {})

    def hf_key(self, name: str) -> str:
        """A checkpoint name as transformers' class of this family and head spells it: legacy names
        renamed (:data:`LEGACY_RENAMES`), the base model's names (with any accepted base prefix, or
        none: a base-model checkpoint) under ``hf_prefix``; head names as they are."""
        bare = self.strip_base_prefix(canonical_name(name))
        if bare.startswith(TOP_LEVEL_PREFIXES):
            return bare
        return self._under_base(bare)

    def _under_base(self, name: str) -> str:
        return f"{self.hf_prefix}.{name}" if self.hf_prefix else name

    def strip_base_prefix(self, name: str) -> str:
        for prefix in self.accepted_prefixes:
            if name.startswith(prefix):
                return name[len(prefix):]
        return name

    def to_hf_name(self, checkpoint_name: str) -> str:
        """A table name as transformers' class writes it (base prefix before encoder names)."""
        if checkpoint_name.startswith(self.head_prefixes):
            return checkpoint_name
        return self._under_base(checkpoint_name)

    @property
    def bias_is_decoders(self) -> bool:
        """The head's bias is the decoder's own (ModernBERT's ``decoder.bias``), not a separate
        tensor tied to it (RoBERTa's ``lm_head.bias`` / ``lm_head.decoder.bias``)."""
        return self.head_decoder is not None and self.head_bias == f"{self.head_decoder}.bias"

    def skipped_when_loading(self, tied: bool) -> Tuple[str, ...]:
        """Tied: the decoder copies are redundant. Untied: HF's forward uses the decoder's bias."""
        if self.head_decoder is None:
            return ()
        if self.bias_is_decoders:
            return (f"{self.head_decoder}.weight",) if tied else ()
        if tied:
            return (f"{self.head_decoder}.weight", f"{self.head_decoder}.bias")
        return (self.head_bias,)

    def saved_duplicates(self, tied: bool) -> Tuple[str, ...]:
        """Names HF does not store (tied to another saved tensor)."""
        if self.head_decoder is None or self.bias_is_decoders or not tied:
            return ()
        return (f"{self.head_decoder}.bias",)

    def checkpoint_to_engine_name(self, name: str) -> Optional[Tuple[str, Optional[str]]]:
        """Map one checkpoint tensor name to ``(engine_name, shard_id)``; None if ignored.

        Raises KeyError for a name that is neither mapped nor deliberately ignored, so unexpected
        tensors are never dropped silently.
        """
        name = self.strip_base_prefix(canonical_name(name))
        if any(p.match(name) for p in self.ignored):
            return None
        for pattern, engine, shard in self._forward:
            m = pattern.match(name)
            if m:
                return engine.format(i=m.groupdict().get("i")), shard
        raise KeyError(name)

    def engine_to_checkpoint_names(self, engine_name: str) -> Tuple[Tuple[str, Optional[str]], ...]:
        """Inverse of the table: the checkpoint names (without base prefix) that fill ``engine_name``."""
        cached = self._reverse_cache.get(engine_name)
        if cached is None:
            out = []
            for pattern, ckpt, shard in self._reverse:
                m = pattern.match(engine_name)
                if m:
                    out.append((ckpt.format(i=m.groupdict().get("i")), shard))
            cached = self._reverse_cache[engine_name] = tuple(out)
        return cached


# How SGLang splits each engine parameter over TP ranks, by name suffix (anything else is
# replicated): dim 0 = output rows (column-parallel linear, vocab-parallel embedding), dim 1 =
# input columns (row-parallel linear). ``parts``: fused parts stacked on each rank ([q_r; k_r; v_r]).
# ``sized_by``: the real extent is the config's vocabulary / FFN size; SGLang pads the rest
# (:mod:`.layout` holds the padding rules and turns this table into one layout per parameter).
@dataclass(frozen=True)
class Split:
    dim: int
    parts: Tuple[str, ...] = ()
    sized_by: Optional[str] = None  # "vocab" | "intermediate"


QKV_SHARDS = ("q", "k", "v")
# GeGLU's fused up-projection (ModernBERT's ``Wi``): the half act() is applied to, then the gate.
GATE_UP_SHARDS = ("input", "gate")
# The shard id of a row whose one checkpoint tensor holds every fused part, stacked along dim 0
# (ModernBERT's ``Wqkv`` = [q; k; v], ``Wi`` = [input; gate]): loaded part by part, saved whole.
ALL_PARTS = "*"
# What SGLang's weight loader calls each part (QKVParallelLinear: "q"/"k"/"v";
# MergedColumnParallelLinear: the index of the output size).
LOADER_SHARD_IDS = {"input": 0, "gate": 1}
SPLITS = {
    "qkv_proj.weight": Split(0, QKV_SHARDS),
    "qkv_proj.bias": Split(0, QKV_SHARDS),
    "o_proj.weight": Split(1),
    "fc_in.weight": Split(0, sized_by="intermediate"),
    "fc_in.bias": Split(0, sized_by="intermediate"),
    "gate_up_proj.weight": Split(0, GATE_UP_SHARDS, sized_by="intermediate"),
    "gate_up_proj.bias": Split(0, GATE_UP_SHARDS, sized_by="intermediate"),
    "down_proj.weight": Split(1, sized_by="intermediate"),
    "word_embeddings.weight": Split(0, sized_by="vocab"),
    "lm_head.bias": Split(0, sized_by="vocab"),
    "lm_head.decoder.weight": Split(0, sized_by="vocab"),
}


@dataclass(frozen=True)
class LoraTarget:
    """An engine module LoRA can adapt: the HF module it stands for (under ``encoder.layer.N.``),
    the engine layer whose weight it adapts (``parent.base``; SGLang's LoRA buffer is named after
    ``base``) and, in the fused projection, which part."""

    module: str
    hf_module: str
    parent: str
    base: str
    part: Optional[str] = None

    def engine_weight(self, layer: int) -> str:
        return f"layers.{layer}.{self.parent}.{self.base}.weight"

    @property
    def fused(self) -> bool:
        """One adapter matrix pair over every part of a fused layer (ModernBERT's ``Wqkv``, ``Wi``):
        PEFT's A is shared by the parts (SGLang keeps one copy per part), its B stacks them."""
        return self.part == ALL_PARTS

    @property
    def slice_index(self) -> int:
        """Where this target sits in SGLang's stacked buffer of ``base``."""
        return QKV_SHARDS.index(self.part) if self.part and not self.fused else 0


LORA_TARGETS = {t.module: t for t in (
    LoraTarget("q_proj", "attention.self.query", "self_attn", "qkv_proj", "q"),
    LoraTarget("k_proj", "attention.self.key", "self_attn", "qkv_proj", "k"),
    LoraTarget("v_proj", "attention.self.value", "self_attn", "qkv_proj", "v"),
    LoraTarget("o_proj", "attention.output.dense", "self_attn", "o_proj"),
    LoraTarget("fc_in", "intermediate.dense", "mlp", "fc_in"),
    LoraTarget("down_proj", "output.dense", "mlp", "down_proj"),
    LoraTarget("qkv_proj", "attn.Wqkv", "self_attn", "qkv_proj", ALL_PARTS),
    LoraTarget("gate_up_proj", "mlp.Wi", "mlp", "gate_up_proj", ALL_PARTS),
)}
# RoBERTa's / BERT's engine modules -> the HF modules they stand for (under ``encoder.layer.N.``).
ENCODER_LORA_MODULES = tuple((m, LORA_TARGETS[m].hf_module)
                             for m in ("q_proj", "k_proj", "v_proj", "o_proj", "fc_in", "down_proj"))
LORA_MODULES = dict(ENCODER_LORA_MODULES)
LORA_BASE_MODULES = tuple(dict.fromkeys(LORA_TARGETS[m].base for m in LORA_MODULES))
FUSED_QKV_TARGETS = tuple(m for m, t in LORA_TARGETS.items() if t.part and not t.fused)


ROBERTA = WeightMap(
    family="roberta",
    hf_prefix="roberta",
    accepted_prefixes=("roberta.", "camembert.", "xlm_roberta."),
    head_prefix="lm_head.",
    head_dense_module="lm_head.dense",
    head_bias="lm_head.bias",
    head_decoder="lm_head.decoder",
    rows=tuple(ENCODER_ROWS + _head_rows("lm_head.dense", "lm_head.layer_norm", "lm_head.bias", "lm_head.decoder")),
    head_prefixes=("lm_head.",),
    lora_modules=ENCODER_LORA_MODULES,
)
BERT = WeightMap(
    family="bert",
    hf_prefix="bert",
    accepted_prefixes=("bert.",),
    head_prefix="cls.predictions.",
    head_dense_module="cls.predictions.transform.dense",
    head_bias="cls.predictions.bias",
    head_decoder="cls.predictions.decoder",
    rows=tuple(ENCODER_ROWS + _head_rows("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
                                         "cls.predictions.bias", "cls.predictions.decoder")),
    # BertForPreTraining checkpoints also carry the next-sentence head; it is not the MLM's.
    ignored=(re.compile(r"^embeddings\.position_ids$"), re.compile(r"^pooler\."),
             re.compile(r"^cls\.seq_relationship\.")),
    head_prefixes=("cls.predictions.",),
    lora_modules=ENCODER_LORA_MODULES,
)
# ModernBERT: pre-norm layers, fused ``Wqkv`` and GeGLU ``Wi`` (each one checkpoint tensor over
# the engine's fused parts), no position or token-type embeddings (rotary positions), a final norm.
# Biases and norm biases exist only when the config asks for them; rows without a tensor never match.
MODERNBERT_ENCODER_ROWS: List[Row] = [
    ("embeddings.tok_embeddings.weight", "embeddings.word_embeddings.weight", None),
    ("embeddings.norm.weight", "embeddings.layer_norm.weight", None),
    ("embeddings.norm.bias", "embeddings.layer_norm.bias", None),
    ("layers.{i}.attn_norm.weight", "layers.{i}.attn_norm.weight", None),
    ("layers.{i}.attn_norm.bias", "layers.{i}.attn_norm.bias", None),
    ("layers.{i}.attn.Wqkv.weight", "layers.{i}.self_attn.qkv_proj.weight", ALL_PARTS),
    ("layers.{i}.attn.Wqkv.bias", "layers.{i}.self_attn.qkv_proj.bias", ALL_PARTS),
    ("layers.{i}.attn.Wo.weight", "layers.{i}.self_attn.o_proj.weight", None),
    ("layers.{i}.attn.Wo.bias", "layers.{i}.self_attn.o_proj.bias", None),
    ("layers.{i}.mlp_norm.weight", "layers.{i}.mlp_norm.weight", None),
    ("layers.{i}.mlp_norm.bias", "layers.{i}.mlp_norm.bias", None),
    ("layers.{i}.mlp.Wi.weight", "layers.{i}.mlp.gate_up_proj.weight", ALL_PARTS),
    ("layers.{i}.mlp.Wi.bias", "layers.{i}.mlp.gate_up_proj.bias", ALL_PARTS),
    ("layers.{i}.mlp.Wo.weight", "layers.{i}.mlp.down_proj.weight", None),
    ("layers.{i}.mlp.Wo.bias", "layers.{i}.mlp.down_proj.bias", None),
    ("final_norm.weight", "final_norm.weight", None),
    ("final_norm.bias", "final_norm.bias", None),
]
MODERNBERT = WeightMap(
    family="modernbert",
    hf_prefix="model",
    accepted_prefixes=("model.",),
    head_prefix="head.",
    head_dense_module="head.dense",
    head_bias="decoder.bias",
    head_decoder="decoder",
    rows=tuple(MODERNBERT_ENCODER_ROWS + [
        ("head.dense.weight", "lm_head.dense.weight", None),
        ("head.dense.bias", "lm_head.dense.bias", None),
        ("head.norm.weight", "lm_head.layer_norm.weight", None),
        ("head.norm.bias", "lm_head.layer_norm.bias", None),
        ("decoder.weight", "lm_head.decoder.weight", None),
        ("decoder.bias", "lm_head.bias", None),
    ]),
    ignored=(),
    head_prefixes=("head.", "decoder."),
    encoder_rows=tuple(MODERNBERT_ENCODER_ROWS),
    # PEFT's names: "Wo" is both the attention's and the MLP's output (its matching rules tell them
    # apart by the full module path); Wqkv and Wi are fused (one A shared by their parts).
    lora_modules=(("qkv_proj", "attn.Wqkv"), ("o_proj", "attn.Wo"), ("gate_up_proj", "mlp.Wi"),
                  ("down_proj", "mlp.Wo")),
    layer_prefix="layers",
)
# Every base-model prefix any family uses (PEFT adapter keys may carry any of them).
BASE_MODEL_PREFIXES = tuple(dict.fromkeys(p for m in (ROBERTA, BERT, MODERNBERT) for p in m.accepted_prefixes))


def head_weight_map(masked_lm: WeightMap, head_name: str) -> WeightMap:
    """A family's names for another head: the encoder rows of its masked-LM map plus the head's
    own (:mod:`.heads`); the pooler is loaded where the head has one, ignored elsewhere."""
    from .heads import HEADS, task_head_rows, top_level_prefixes

    if head_name == masked_lm.head:
        return masked_lm
    key = (masked_lm.family, head_name)
    if key not in _HEAD_MAPS:
        head = HEADS[head_name]
        shape = head.shape(masked_lm.family)
        ignored = tuple(p for p in masked_lm.ignored if not (shape.pooler and p is _POOLER))
        _HEAD_MAPS[key] = replace(
            masked_lm, hf_prefix=masked_lm.hf_prefix if head.under_base else "", head=head_name,
            head_prefix=(top_level_prefixes(shape) or ("pooler.",))[0], head_prefixes=top_level_prefixes(shape),
            head_dense_module=None, head_bias=None, head_decoder=None, ignored=ignored,
            rows=tuple(masked_lm.encoder_rows) + tuple(task_head_rows(shape)))
    return _HEAD_MAPS[key]


_HEAD_MAPS: dict = {}


def weight_map_for(config, head: Optional[str] = None) -> WeightMap:
    """The weight map of a config's family (:mod:`.families`; KeyError for an unsupported one) for
    ``head`` (default: the head the config names, :data:`.heads.HEAD_CONFIG_KEY`, else masked LM)."""
    from .families import family_for
    from .heads import head_of

    return head_weight_map(family_for(config).weight_map, head or head_of(config).name)
