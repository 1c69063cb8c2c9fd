"""``SGLangAutoModelForMaskedLM``: the family class for a checkpoint's ``model_type``, read from its
config.json as JSON (no code from the checkpoint runs)."""

from __future__ import annotations

import os
from typing import Dict, Type

from ..errors import CheckpointError
from .masked_lm import SGLangMaskedLM


def _families() -> Dict[str, Type[SGLangMaskedLM]]:
    from .bert import SGLangBertForMaskedLM
    from .roberta import SGLangCamembertForMaskedLM, SGLangRobertaForMaskedLM, SGLangXLMRobertaForMaskedLM

    return {"roberta": SGLangRobertaForMaskedLM, "xlm-roberta": SGLangXLMRobertaForMaskedLM,
            "camembert": SGLangCamembertForMaskedLM, "bert": SGLangBertForMaskedLM}


class SGLangAutoModelForMaskedLM:
    """Like transformers' ``AutoModelForMaskedLM``: ``from_pretrained(path, ...)`` returns the
    engine-backed class of the checkpoint's family (bert, roberta, xlm-roberta, camembert)."""

    def __init__(self, *args, **kwargs):
        raise TypeError("use SGLangAutoModelForMaskedLM.from_pretrained(path, ...)")

    @classmethod
    def class_for(cls, path) -> Type[SGLangMaskedLM]:
        from ..checkpoint import locate_checkpoint, read_config_dict, refuse_remote_code

        directory = locate_checkpoint(path).directory
        data = read_config_dict(os.path.join(directory, "config.json"))
        refuse_remote_code(data, directory)
        model_type = data.get("model_type")
        families = _families()
        if model_type not in families:
            raise CheckpointError(f"{directory!r} has model_type {model_type!r}; SGLangAutoModelForMaskedLM loads "
                                  f"{sorted(families)}")
        return families[model_type]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> SGLangMaskedLM:
        subfolder = kwargs.get("subfolder")
        path = os.path.join(os.fspath(pretrained_model_name_or_path), subfolder) if subfolder else \
            pretrained_model_name_or_path
        return cls.class_for(path).from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
