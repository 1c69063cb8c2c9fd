"""``SGLangBertForMaskedLM``: transformers' ``BertForMaskedLM`` interface on the same engine and
SGLang-side layers as RoBERTa, through BERT's own weight map (``bert.`` prefix,
``cls.predictions.*`` head) and BERT's position ids (0..T-1)."""

from __future__ import annotations

from transformers import BertConfig

from .masked_lm import SGLangMaskedLM


class SGLangBertForMaskedLM(SGLangMaskedLM):
    config_class = BertConfig
    base_model_prefix = "bert"
    absolute_position_ids = True
    model_types = ("bert",)
    hf_model_class = "BertForMaskedLM"
