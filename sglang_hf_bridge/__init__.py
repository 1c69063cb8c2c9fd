"""sglang_hf_bridge: transformers' encoder classes (masked LM, classification, QA, embeddings), executed by SGLang.

Importing the package is cheap: SGLang and PEFT are imported when the first model is loaded.
The model classes (and transformers) are imported on first attribute access.
"""

from . import compat as _compat
from . import errors as _errors
from .errors import *  # noqa: F403  (every exception class is public)

# Process-level setting SGLang reads when it is first imported (see compat).
_compat.configure_sglang_environment()

__version__ = "0.1.0"

_LAZY = {
    "SGLangRobertaForMaskedLM": ".modeling.roberta",
    "SGLangXLMRobertaForMaskedLM": ".modeling.roberta",
    "SGLangCamembertForMaskedLM": ".modeling.roberta",
    "SGLangBertForMaskedLM": ".modeling.bert",
    "SGLangAutoModelForMaskedLM": ".modeling.auto",
    "SGLangRobertaForSequenceClassification": ".modeling.roberta",
    "SGLangRobertaForTokenClassification": ".modeling.roberta",
    "SGLangRobertaForQuestionAnswering": ".modeling.roberta",
    "SGLangRobertaModel": ".modeling.roberta",
    "SGLangXLMRobertaForSequenceClassification": ".modeling.roberta",
    "SGLangXLMRobertaForTokenClassification": ".modeling.roberta",
    "SGLangXLMRobertaForQuestionAnswering": ".modeling.roberta",
    "SGLangXLMRobertaModel": ".modeling.roberta",
    "SGLangCamembertForSequenceClassification": ".modeling.roberta",
    "SGLangCamembertForTokenClassification": ".modeling.roberta",
    "SGLangCamembertForQuestionAnswering": ".modeling.roberta",
    "SGLangCamembertModel": ".modeling.roberta",
    "SGLangBertForSequenceClassification": ".modeling.bert",
    "SGLangBertForTokenClassification": ".modeling.bert",
    "SGLangBertForQuestionAnswering": ".modeling.bert",
    "SGLangBertModel": ".modeling.bert",
    "SGLangAutoModelForSequenceClassification": ".modeling.auto",
    "SGLangAutoModelForTokenClassification": ".modeling.auto",
    "SGLangAutoModelForQuestionAnswering": ".modeling.auto",
    "SGLangAutoModel": ".modeling.auto",
    "SGLangModernBertForMaskedLM": ".modeling.modernbert",
    "SGLangModernBertForSequenceClassification": ".modeling.modernbert",
    "SGLangModernBertForTokenClassification": ".modeling.modernbert",
    "SGLangModernBertForQuestionAnswering": ".modeling.modernbert",
    "SGLangModernBertModel": ".modeling.modernbert",
}

__all__ = [*_LAZY, *_errors.__all__]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
