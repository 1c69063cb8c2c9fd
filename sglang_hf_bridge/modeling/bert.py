"""``SGLangBertForMaskedLM``: transformers' ``BertForMaskedLM`` interface on the same engine and
SGLang-side layers as RoBERTa, through BERT's own weight map (``bert.`` prefix,
``cls.predictions.*`` head) and BERT's position ids (0..T-1)."""

from __future__ import annotations

from transformers import BertConfig

from ..sglang_models.families import BERT_FAMILY
from .encoder_model import SGLangEncoderModel
from .masked_lm import SGLangMaskedLM
from .question_answering import SGLangQuestionAnswering
from .sequence_classification import SGLangSequenceClassification
from .token_classification import SGLangTokenClassification


class SGLangBertForMaskedLM(SGLangMaskedLM):
    config_class = BertConfig
    family = BERT_FAMILY
    hf_model_class = "BertForMaskedLM"


class SGLangBertForSequenceClassification(SGLangSequenceClassification):
    """``BertForSequenceClassification``'s interface: pooler + classifier at ``[CLS]``."""

    config_class = BertConfig
    family = BERT_FAMILY


class SGLangBertForTokenClassification(SGLangTokenClassification):
    config_class = BertConfig
    family = BERT_FAMILY


class SGLangBertForQuestionAnswering(SGLangQuestionAnswering):
    config_class = BertConfig
    family = BERT_FAMILY


class SGLangBertModel(SGLangEncoderModel):
    """``BertModel``'s interface (with its pooler): what sentence-transformers' BERT models run."""

    config_class = BertConfig
    family = BERT_FAMILY
