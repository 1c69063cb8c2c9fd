"""One descriptor per checkpoint family: every fact the library needs about a family, in one place.

A family is a set of ``model_type`` s that share one weight map (checkpoint names), one position-id
rule and one SGLang-side model class. The loader, the saver, the Auto class, the input checks, the
engine's weight versions and the face classes all read these descriptors; none keeps its own list.
Adding a family (docs/architecture.md, "Adding a family or a head") is one :class:`Family` here,
its name rows in :mod:`.weight_map`, and a face class that names it. Pure tables: importing this
module imports neither SGLang nor transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

from .weight_map import BERT, MODERNBERT, ROBERTA, WeightMap

ENCODER_CLASS = "sglang_hf_bridge.sglang_models.encoder.SGLangBridgeEncoder"


@dataclass(frozen=True)
class Family:
    """``hf_classes``: each model_type and transformers' masked-LM class for it (the name written
    to ``architectures`` on save). ``absolute_position_ids``: BERT's 0..T-1; otherwise RoBERTa's,
    counted from ``pad_token_id + 1`` (so the padding index and those before it are not positions).
    ``ties_by_default``: what a config without ``tie_word_embeddings`` means."""

    name: str
    hf_classes: Mapping[str, str]
    weight_map: WeightMap
    absolute_position_ids: bool
    sglang_model_class: str = ENCODER_CLASS
    ties_by_default: bool = True

    @property
    def model_types(self) -> Tuple[str, ...]:
        return tuple(self.hf_classes)

    @property
    def sglang_architecture(self) -> str:
        """The name SGLang's model registry knows the SGLang-side class by."""
        return self.sglang_model_class.rpartition(".")[2]

    @property
    def name_prefixes(self) -> Tuple[str, ...]:
        """Checkpoint name prefixes that only this family writes (how a config-less checkpoint
        tells its family)."""
        return (f"{self.weight_map.hf_prefix}.", self.weight_map.head_prefix)

    def max_sequence_length(self, config) -> int:
        """Tokens one sequence may have."""
        if self.absolute_position_ids:
            return int(config.max_position_embeddings)
        return int(config.max_position_embeddings - config.pad_token_id - 1)

    def sliding_window(self, config) -> Optional[int]:
        """Tokens each side a windowed layer sees (None: every layer sees the whole sequence, or
        the window is wider than any sequence)."""
        if self.name != "modernbert":
            return None
        types = getattr(config, "layer_types", None) or []
        window = int(config.local_attention) // 2
        if "sliding_attention" not in types or window + 1 >= self.max_sequence_length(config):
            return None
        return window

    def ties_word_embeddings(self, config) -> bool:
        """Whether the MLM decoder is the word-embedding matrix."""
        return bool(getattr(config, "tie_word_embeddings", self.ties_by_default))


ROBERTA_FAMILY = Family(
    name="roberta",
    hf_classes={"roberta": "RobertaForMaskedLM", "xlm-roberta": "XLMRobertaForMaskedLM",
                "camembert": "CamembertForMaskedLM"},
    weight_map=ROBERTA,
    absolute_position_ids=False,
)
BERT_FAMILY = Family(
    name="bert",
    hf_classes={"bert": "BertForMaskedLM"},
    weight_map=BERT,
    absolute_position_ids=True,
)
MODERNBERT_FAMILY = Family(
    name="modernbert",
    hf_classes={"modernbert": "ModernBertForMaskedLM"},
    weight_map=MODERNBERT,
    absolute_position_ids=True,  # 0..T-1 over the padded row, as transformers' default position_ids
    sglang_model_class="sglang_hf_bridge.sglang_models.modernbert.SGLangModernBertEncoder",
)
FAMILIES: Tuple[Family, ...] = (ROBERTA_FAMILY, BERT_FAMILY, MODERNBERT_FAMILY)

# model_type -> transformers' masked-LM class name, for every supported model_type.
SUPPORTED_MODEL_TYPES: Dict[str, str] = {t: c for f in FAMILIES for t, c in f.hf_classes.items()}
_BY_MODEL_TYPE: Dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}
# Every family's masked-LM head prefix (``lm_head.``, ``cls.predictions.``).
HEAD_PREFIXES: Tuple[str, ...] = tuple(f.weight_map.head_prefix for f in FAMILIES)


def family_for(config_or_model_type) -> Family:
    """The family of a config (or a model_type string); KeyError for an unsupported one."""
    model_type = config_or_model_type if isinstance(config_or_model_type, str) else \
        getattr(config_or_model_type, "model_type", None)
    return _BY_MODEL_TYPE[model_type]


def ties_word_embeddings(config) -> bool:
    """Whether ``config``'s MLM decoder is tied to the word embeddings (its family's default when
    the config does not say)."""
    return family_for(config).ties_word_embeddings(config)
