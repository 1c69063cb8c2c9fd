"""RoBERTa-family faces: ``SGLangRobertaForMaskedLM`` (also loads XLM-RoBERTa and CamemBERT
checkpoints, the same architecture), and the family names users look for."""

from __future__ import annotations

from transformers import CamembertConfig, RobertaConfig, XLMRobertaConfig

from ..sglang_models.families import ROBERTA_FAMILY
from .masked_lm import SGLangMaskedLM


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
