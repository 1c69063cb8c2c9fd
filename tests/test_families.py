"""The family descriptors (engine-free): one place for every fact about a checkpoint family, and
every reader takes it from there."""

from __future__ import annotations

import pytest
import transformers
from transformers import BertConfig, ModernBertConfig, RobertaConfig, XLMRobertaConfig

from sglang_hf_bridge import (
    SGLangAutoModelForMaskedLM,
    SGLangBertForMaskedLM,
    SGLangCamembertForMaskedLM,
    SGLangRobertaForMaskedLM,
    SGLangXLMRobertaForMaskedLM,
)
from sglang_hf_bridge.checkpoint import SUPPORTED_MODEL_TYPES
from sglang_hf_bridge.sglang_models.families import (
    BERT_FAMILY,
    FAMILIES,
    HEAD_PREFIXES,
    MODERNBERT_FAMILY,
    ROBERTA_FAMILY,
    family_for,
    ties_word_embeddings,
)
from sglang_hf_bridge.sglang_models.weight_map import weight_map_for


def test_every_model_type_belongs_to_one_family_with_a_real_transformers_class():
    seen = [t for f in FAMILIES for t in f.model_types]
    assert len(seen) == len(set(seen)) and set(seen) == set(SUPPORTED_MODEL_TYPES)
    for family in FAMILIES:
        for model_type, class_name in family.hf_classes.items():
            hf_class = getattr(transformers, class_name)
            assert hf_class.config_class.model_type == model_type
            assert hf_class.base_model_prefix == family.weight_map.hf_prefix


def test_face_classes_read_their_family():
    for cls, family in ((SGLangRobertaForMaskedLM, ROBERTA_FAMILY), (SGLangXLMRobertaForMaskedLM, ROBERTA_FAMILY),
                        (SGLangCamembertForMaskedLM, ROBERTA_FAMILY), (SGLangBertForMaskedLM, BERT_FAMILY)):
        assert cls.family is family and cls.model_types == family.model_types
        assert cls.base_model_prefix == family.weight_map.hf_prefix
        assert cls.absolute_position_ids == family.absolute_position_ids
        assert cls.sglang_model_class.endswith("." + cls.sglang_architecture)
        assert cls.hf_model_class in family.hf_classes.values()
    from sglang_hf_bridge.modeling.auto import _families

    assert {t: c.config_class.model_type for t, c in _families().items()} == {t: t for t in SUPPORTED_MODEL_TYPES}
    assert SGLangAutoModelForMaskedLM.class_for  # picks from the same table


@pytest.mark.parametrize("config, family, max_len", [
    (RobertaConfig(max_position_embeddings=514, pad_token_id=1), ROBERTA_FAMILY, 512),
    (XLMRobertaConfig(max_position_embeddings=514, pad_token_id=1), ROBERTA_FAMILY, 512),
    (BertConfig(max_position_embeddings=512, pad_token_id=0), BERT_FAMILY, 512),
    (ModernBertConfig(max_position_embeddings=8192, pad_token_id=50283), MODERNBERT_FAMILY, 8192),
])
def test_position_rule_and_tying(config, family, max_len):
    assert family_for(config) is family and family_for(config.model_type) is family
    assert weight_map_for(config) is family.weight_map
    assert family.max_sequence_length(config) == max_len
    assert ties_word_embeddings(config)
    config.tie_word_embeddings = False
    assert not ties_word_embeddings(config)


def test_unsupported_model_type_and_head_prefixes():
    with pytest.raises(KeyError):
        family_for("gpt2")
    assert HEAD_PREFIXES == ("lm_head.", "cls.predictions.", "head.")
    from sglang_hf_bridge.engine.versions import HEAD, base_layer_of

    assert base_layer_of("cls.predictions.transform.dense.weight") == HEAD
    assert base_layer_of("lm_head.dense.weight") == HEAD
