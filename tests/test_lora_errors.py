"""Bad adapters get clear errors naming the problem; the model keeps working afterwards."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_checkpoint, max_abs_diff
from peft import LoraConfig
from test_lora import IDS, MASK, logits, make_adapter

from sglang_hf_bridge import AdapterError, SGLangRobertaForMaskedLM
from sglang_hf_bridge.lora import UnsupportedAdapterError
from sglang_hf_bridge.lora.files import AdapterFileError


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora-err-base")
    hf = build_checkpoint(path, "roberta", seed=12)
    model = SGLangRobertaForMaskedLM.from_pretrained(path, max_lora_rank=8, max_loras=2)
    yield hf, model
    model.close()


def _still_works(hf, model):
    assert model.active_adapters() == []
    assert max_abs_diff(logits(model), logits(hf)) <= 1e-5
    assert model.engine_pool_stats() == model.engine_pool_capacity()


def test_wrong_hidden_size(base, tmp_path):
    hf, model = base
    other = build_checkpoint(tmp_path / "other", "roberta", hidden_size=48, num_attention_heads=4)
    make_adapter(other, tmp_path / "a", r=4, target_modules=["query"])
    with pytest.raises(AdapterError, match=r"do not fit rank 4 and this model's \(64 -> 64\)"):
        model.load_adapter(tmp_path / "a")
    _still_works(hf, model)


def test_rank_above_maximum(base, tmp_path):
    hf, model = base
    make_adapter(hf, tmp_path, r=16, target_modules=["query"])
    with pytest.raises(UnsupportedAdapterError, match="rank r=16 is above the engine's max_lora_rank=8"):
        model.load_adapter(tmp_path)
    _still_works(hf, model)


@pytest.mark.parametrize(
    "config,message",
    [
        (dict(target_modules=["query"], use_dora=True), "DoRA"),
        (dict(target_modules=["query"], modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(target_modules=["query"], bias="lora_only"), "bias training"),
        (dict(target_modules=["dense"]), "lm_head.dense is not supported"),
        (dict(target_modules=["word_embeddings", "query"]), "word_embeddings is not supported"),
        (dict(target_modules=["query"], rank_pattern={"value": 2}), "rank_pattern"),
    ],
)
def test_unsupported_peft_features(base, tmp_path, config, message):
    hf, model = base
    try:
        make_adapter(hf, tmp_path, r=4, **config)
    except Exception:  # noqa: BLE001 - PEFT itself may refuse; then build the config file by hand
        pytest.skip("PEFT refused to build this adapter")
    with pytest.raises(UnsupportedAdapterError, match=message):
        model.load_adapter(tmp_path)
    with pytest.raises(UnsupportedAdapterError, match=message):
        model.add_adapter(LoraConfig(r=4, **config), adapter_name="x")
    _still_works(hf, model)


def test_unknown_module_names(base, tmp_path):
    hf, model = base
    make_adapter(hf, tmp_path, r=4, target_modules=["query"])
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "v_proj"]  # llama-style names: nothing here matches
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedAdapterError, match="match no module of this model"):
        model.load_adapter(tmp_path)
    _still_works(hf, model)


def test_weights_for_modules_the_engine_cannot_place(base, tmp_path):
    from safetensors.torch import load_file, save_file

    hf, model = base
    make_adapter(hf, tmp_path, r=4, target_modules=["query"])
    state = load_file(tmp_path / "adapter_model.safetensors")
    state["base_model.model.lm_head.dense.lora_A.weight"] = torch.zeros(4, 64)
    save_file(state, tmp_path / "adapter_model.safetensors")
    with pytest.raises(UnsupportedAdapterError, match="cannot place: base_model.model.lm_head.dense"):
        model.load_adapter(tmp_path)
    _still_works(hf, model)


def test_missing_files(base, tmp_path):
    hf, model = base
    with pytest.raises(AdapterFileError, match="does not exist"):
        model.load_adapter(tmp_path / "nope")
    with pytest.raises(AdapterFileError, match="no adapter_config.json"):
        model.load_adapter(tmp_path)
    make_adapter(hf, tmp_path / "w", r=4, target_modules=["query"])
    (tmp_path / "w" / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterFileError, match="no adapter_model.safetensors"):
        model.load_adapter(tmp_path / "w")
    _still_works(hf, model)


def test_bad_names_and_limits(base, tmp_path):
    hf, model = base
    make_adapter(hf, tmp_path, r=4, target_modules=["query"])
    model.load_adapter(tmp_path, adapter_name="one")
    try:
        with pytest.raises(ValueError, match="already loaded"):
            model.load_adapter(tmp_path, adapter_name="one")
        with pytest.raises(ValueError, match="invalid adapter name"):
            model.load_adapter(tmp_path, adapter_name="__base__")
        model.load_adapter(tmp_path, adapter_name="two")
        with pytest.raises(AdapterError, match="at most 2 adapters"):
            model.load_adapter(tmp_path, adapter_name="three")
        with pytest.raises(ValueError, match="adapter_names has 1 entries for a batch of 4"):
            model(IDS, attention_mask=MASK, adapter_names=["one"])
        with pytest.raises(ValueError, match="no adapter named 'zzz'"):
            model(IDS, attention_mask=MASK, adapter_names=["zzz"] * 4)
    finally:
        model.delete_adapter(["one", "two"])
    _still_works(hf, model)


def test_lora_disabled_model_says_so(tmp_path):
    hf = build_checkpoint(tmp_path / "m", "roberta")
    make_adapter(hf, tmp_path / "a", r=4, target_modules=["query"])
    with SGLangRobertaForMaskedLM.from_pretrained(tmp_path / "m", enable_lora=False) as model:
        with pytest.raises(AdapterError, match="enable_lora=False"):
            model.load_adapter(tmp_path / "a")
        assert max_abs_diff(logits(model), logits(hf)) <= 1e-5
