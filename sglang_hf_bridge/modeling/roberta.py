"""RoBERTa-family faces: ``SGLangRobertaForMaskedLM`` (also loads XLM-RoBERTa and CamemBERT
checkpoints, the same architecture), and the family names users look for."""

from __future__ import annotations

from transformers import CamembertConfig, RobertaConfig, XLMRobertaConfig

from ..sglang_models.families import ROBERTA_FAMILY
from .encoder_model import SGLangEncoderModel
from .masked_lm import SGLangMaskedLM
from .question_answering import SGLangQuestionAnswering
from .sequence_classification import SGLangSequenceClassification
from .token_classification import SGLangTokenClassification


class SGLangRobertaForMaskedLM(SGLangMaskedLM):
    """transformers' ``RobertaForMaskedLM`` interface on an SGLang engine (RoBERTa, XLM-RoBERTa
    and CamemBERT checkpoints)."""

    config_class = RobertaConfig
    family = ROBERTA_FAMILY
    hf_model_class = "RobertaForMaskedLM"


class SGLangXLMRobertaForMaskedLM(SGLangRobertaForMaskedLM):
    """``XLMRobertaForMaskedLM``'s interface (the same engine model as RoBERTa)."""

    config_class = XLMRobertaConfig
    hf_model_class = "XLMRobertaForMaskedLM"


class SGLangCamembertForMaskedLM(SGLangRobertaForMaskedLM):
    """``CamembertForMaskedLM``'s interface (the same engine model as RoBERTa)."""

    config_class = CamembertConfig
    hf_model_class = "CamembertForMaskedLM"


# ---------------------------------------------------------------------- task heads and the base model
# transformers' class of each (``RobertaForSequenceClassification`` ...) follows from the family,
# the config class and the head (SGLangPreTrainedModel.__init_subclass__).
class SGLangRobertaForSequenceClassification(SGLangSequenceClassification):
    """``RobertaForSequenceClassification``'s interface: dense + tanh + out_proj at ``<s>``."""

    config_class = RobertaConfig
    family = ROBERTA_FAMILY


class SGLangXLMRobertaForSequenceClassification(SGLangRobertaForSequenceClassification):
    config_class = XLMRobertaConfig


class SGLangCamembertForSequenceClassification(SGLangRobertaForSequenceClassification):
    config_class = CamembertConfig


class SGLangRobertaForTokenClassification(SGLangTokenClassification):
    """``RobertaForTokenClassification``'s interface."""

    config_class = RobertaConfig
    family = ROBERTA_FAMILY


class SGLangXLMRobertaForTokenClassification(SGLangRobertaForTokenClassification):
    config_class = XLMRobertaConfig


class SGLangCamembertForTokenClassification(SGLangRobertaForTokenClassification):
    config_class = CamembertConfig


class SGLangRobertaForQuestionAnswering(SGLangQuestionAnswering):
    """``RobertaForQuestionAnswering``'s interface."""

    config_class = RobertaConfig
    family = ROBERTA_FAMILY


class SGLangXLMRobertaForQuestionAnswering(SGLangRobertaForQuestionAnswering):
    config_class = XLMRobertaConfig


class SGLangCamembertForQuestionAnswering(SGLangRobertaForQuestionAnswering):
    config_class = CamembertConfig


class SGLangRobertaModel(SGLangEncoderModel):
    """``RobertaModel``'s interface (with its pooler)."""

    config_class = RobertaConfig
    family = ROBERTA_FAMILY


class SGLangXLMRobertaModel(SGLangRobertaModel):
    config_class = XLMRobertaConfig


class SGLangCamembertModel(SGLangRobertaModel):
    config_class = CamembertConfig
