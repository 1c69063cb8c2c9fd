"""sentence-transformers on the engine: ``use_sglang_engine(SentenceTransformer(...))``.

sentence-transformers keeps the transformers model of each ``Transformer`` module in
``module.model`` and calls it with the tokenizer's features, reading ``last_hidden_state``
(embedding models) or ``logits`` (cross-encoders). ``use_sglang_engine`` replaces that model by the
engine-backed class of the same family and head, loaded from the model's own in-memory weights
(saved once to a private directory, so fine-tuned or newly initialised weights carry over); pooling,
normalisation, ``similarity`` and the cross-encoder's activation stay sentence-transformers'.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Any, TypeVar

from ..errors import UnsupportedOperationError

ST = TypeVar("ST")


def _auto_class_for(hf_model):
    """The engine's Auto class for the head of transformers' ``hf_model`` (by its class name)."""
    from ..modeling import auto

    name = type(hf_model).__name__
    for auto_cls in (auto.SGLangAutoModelForSequenceClassification, auto.SGLangAutoModelForTokenClassification,
                     auto.SGLangAutoModelForMaskedLM, auto.SGLangAutoModel):
        if name.endswith(auto_cls.head.hf_suffix):
            return auto_cls
    raise UnsupportedOperationError(f"sentence-transformers module holds a {name}; the engine runs encoders "
                                    "(*Model, *ForSequenceClassification, *ForTokenClassification, *ForMaskedLM)")


def _transformer_modules(model):
    from sentence_transformers.base.modules.transformer import Transformer

    found = [m for m in model.modules() if isinstance(m, Transformer)]
    if not found:
        raise UnsupportedOperationError(f"{type(model).__name__} has no sentence-transformers Transformer module to "
                                        "put on the engine")
    return found


def use_sglang_engine(model: ST, **from_pretrained_kwargs: Any) -> ST:
    """Run every transformers model inside ``model`` (a ``SentenceTransformer`` or ``CrossEncoder``)
    on an SGLang engine, in place; returns ``model``. Keywords go to the engine classes'
    ``from_pretrained`` (``tp_size``, ``dtype``, ``max_num_tokens``, ...; ``device`` defaults to the
    model's). ``model.close_engines()`` -- or the end of the process -- stops the engines."""
    engines = []
    for module in _transformer_modules(model):
        hf_model = module.model
        if getattr(hf_model, "_runtime", None) is not None:
            continue  # already on the engine
        auto_cls = _auto_class_for(hf_model)
        kwargs = dict(from_pretrained_kwargs)
        kwargs.setdefault("device", str(hf_model.device))
        kwargs.setdefault("dtype", hf_model.dtype)
        scratch = tempfile.mkdtemp(prefix="sglang-hf-bridge-st-")
        try:
            hf_model.save_pretrained(scratch)
            engine_model = auto_cls.from_pretrained(scratch, **kwargs)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        engine_model.name_or_path = engine_model.config.name_or_path = hf_model.config.name_or_path
        module.model = engine_model
        engines.append(engine_model)

    def close_engines() -> None:
        for engine_model in engines:
            engine_model.close()

    if engines:
        model.close_engines = close_engines
    return model
