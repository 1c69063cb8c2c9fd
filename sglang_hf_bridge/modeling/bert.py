"""``SGLangBertForMaskedLM``: transformers' ``BertForMaskedLM`` interface on the same engine and
SGLang-side layers as RoBERTa, through BERT's own weight map (``bert.`` prefix,
``cls.predictions.*`` head) and BERT's position ids (0..T-1)."""

from __future__ import annotations

from transformers import BertConfig

from ..sglang_models.families import BERT_FAMILY
from .masked_lm import SGLangMaskedLM


class SGLangBertForMaskedLM(SGLangMaskedLM):
    config_class = BertConfig
    family = BERT_FAMILY
    hf_model_class = "BertForMaskedLM"
