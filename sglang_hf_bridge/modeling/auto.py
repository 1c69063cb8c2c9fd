"""The Auto classes (``SGLangAutoModelForMaskedLM``, ``...ForSequenceClassification``,
``...ForTokenClassification``, ``...ForQuestionAnswering``, ``SGLangAutoModel``): the family class
of a checkpoint for one head, picked as transformers' Auto classes pick it -- ``config.json``'s
``model_type`` (read as JSON: no code from the checkpoint runs) -- and, for old configs without
one, from the tensor names (``bert.*`` / ``roberta.*``)."""

from __future__ import annotations

import os
from typing import Dict, Type

from ..errors import CheckpointError
from ..sglang_models.families import FAMILIES
from ..sglang_models.heads import (
    BASE_MODEL,
    MASKED_LM,
    QUESTION_ANSWERING,
    SEQUENCE_CLASSIFICATION,
    TOKEN_CLASSIFICATION,
    Head,
)
from .base import SGLangPreTrainedModel


def _families(head: Head = MASKED_LM) -> Dict[str, Type[SGLangPreTrainedModel]]:
    """model_type -> the face class for it with ``head``: each face class whose config class is
    that model type's, else its family's first class."""
    from . import bert, modernbert, roberta

    out: Dict[str, Type[SGLangPreTrainedModel]] = {}
    for module in (roberta, bert, modernbert):
        for cls in vars(module).values():
            if not (isinstance(cls, type) and issubclass(cls, SGLangPreTrainedModel) and cls.head_spec is head
                    and cls.__module__ == module.__name__ and cls.model_types):
                continue
            for model_type in cls.model_types:
                if cls.config_class.model_type == model_type or model_type not in out:
                    out[model_type] = cls
    return out


def _family_from_tensors(directory: str, use_safetensors) -> str:
    """The model_type of the one family whose own name prefixes the checkpoint's tensors carry."""
    from ..checkpoint import checkpoint_tensor_names, locate_checkpoint

    names = checkpoint_tensor_names(locate_checkpoint(directory, use_safetensors=use_safetensors))
    found = {family.model_types[0] for family in FAMILIES
             if any(n.startswith(family.name_prefixes) for n in names)}
    if len(found) != 1:
        raise CheckpointError(
            f"{directory!r}: config.json has no model_type and the tensor names do not tell the family "
            f"({'both bert and roberta names' if found else 'neither bert.* nor roberta.*'}); load it with "
            "SGLangBertForMaskedLM or SGLangRobertaForMaskedLM, or pass config=BertConfig.from_pretrained(path)")
    return found.pop()


class _SGLangAutoClass:
    """Like transformers' Auto classes: ``from_pretrained(path_or_hub_id, ...)`` returns the
    engine-backed class of the checkpoint's family (bert, roberta, xlm-roberta, camembert, modernbert) with this
    class's head."""

    head: Head = MASKED_LM

    def __init__(self, *args, **kwargs):
        raise TypeError(f"use {type(self).__name__}.from_pretrained(path, ...)")

    @classmethod
    def class_for(cls, path, **kwargs) -> Type[SGLangPreTrainedModel]:
        """The family class of the checkpoint at ``path`` (a directory or a Hub id; ``kwargs`` are
        from_pretrained's: the Hub look-up options, ``config=``, ``use_safetensors``)."""
        from ..checkpoint import read_config_dict, refuse_remote_code
        from ..hub import hub_options, resolve_model_directory

        families = _families(cls.head)
        config = kwargs.get("config")
        model_type = getattr(config, "model_type", None) if config is not None and not isinstance(
            config, (str, os.PathLike)) else None
        if model_type is None:
            directory = resolve_model_directory(path, subfolder=kwargs.get("subfolder"),
                                                use_safetensors=kwargs.get("use_safetensors"), **hub_options(kwargs))
            data = read_config_dict(os.path.join(directory, "config.json"))
            refuse_remote_code(data, directory)
            model_type = data.get("model_type") or _family_from_tensors(directory, kwargs.get("use_safetensors"))
        if model_type not in families:
            raise CheckpointError(f"{os.fspath(path)!r} has model_type {model_type!r}; {cls.__name__} "
                                  f"loads {sorted(families)}")
        return families[model_type]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> SGLangPreTrainedModel:
        return cls.class_for(pretrained_model_name_or_path, **kwargs).from_pretrained(
            pretrained_model_name_or_path, *args, **kwargs)


class SGLangAutoModelForMaskedLM(_SGLangAutoClass):
    """``AutoModelForMaskedLM`` on the engine."""

    head = MASKED_LM


class SGLangAutoModelForSequenceClassification(_SGLangAutoClass):
    """``AutoModelForSequenceClassification`` on the engine."""

    head = SEQUENCE_CLASSIFICATION


class SGLangAutoModelForTokenClassification(_SGLangAutoClass):
    """``AutoModelForTokenClassification`` on the engine."""

    head = TOKEN_CLASSIFICATION


class SGLangAutoModelForQuestionAnswering(_SGLangAutoClass):
    """``AutoModelForQuestionAnswering`` on the engine."""

    head = QUESTION_ANSWERING


class SGLangAutoModel(_SGLangAutoClass):
    """``AutoModel`` on the engine (the base model: hidden states and pooler)."""

    head = BASE_MODEL
