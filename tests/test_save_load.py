"""Checkpoint formats in, HF checkpoints out: transformers' own classes load what we save."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, build_checkpoint, max_abs_diff
from transformers import AutoModelForMaskedLM

from sglang_hf_bridge import SGLangRobertaForMaskedLM

IDS = torch.tensor([[0, 11, 22, 33, 44, 2], [0, 55, 66, 2, 1, 1]])
MASK = (IDS != 1).long()


def _ref(hf):
    with torch.no_grad():
        return hf(IDS, attention_mask=MASK).logits


@pytest.mark.parametrize("family", ["roberta", "xlm-roberta", "camembert"])
def test_save_pretrained_loads_in_transformers_identically(tmp_path, family):
    hf = build_checkpoint(tmp_path / "in", family, seed=7)
    with SGLangRobertaForMaskedLM.from_pretrained(tmp_path / "in") as model:
        ours = model(IDS, attention_mask=MASK).logits
        model.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded) is FAMILIES[family][1]
    assert max_abs_diff(_ref(reloaded), _ref(hf)) == 0.0
    assert max_abs_diff(ours, _ref(reloaded)) <= 1e-5
    # and back onto the engine
    with SGLangRobertaForMaskedLM.from_pretrained(tmp_path / "out") as again:
        assert max_abs_diff(again(IDS, attention_mask=MASK).logits, ours) == 0.0


def test_bin_checkpoint_loads_with_weights_only(tmp_path, monkeypatch):
    hf = build_checkpoint(tmp_path / "st", "roberta", seed=2)
    hf.save_pretrained(tmp_path / "bin", safe_serialization=False) if "safe_serialization" in \
        hf.save_pretrained.__code__.co_varnames else None
    if not (tmp_path / "bin" / "pytorch_model.bin").exists():
        (tmp_path / "bin").mkdir(exist_ok=True)
        hf.config.save_pretrained(tmp_path / "bin")
        torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    with SGLangRobertaForMaskedLM.from_pretrained(tmp_path / "bin") as model:
        assert max_abs_diff(model(IDS, attention_mask=MASK).logits, _ref(hf)) <= 1e-5
    assert calls and all(c is True for c in calls)


def test_sharded_checkpoint_and_progress(tmp_path, capfd):
    hf = build_checkpoint(tmp_path / "one", "roberta", seed=4)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="2MB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    capfd.readouterr()
    with SGLangRobertaForMaskedLM.from_pretrained(tmp_path / "sharded") as model:
        assert max_abs_diff(model(IDS, attention_mask=MASK).logits, _ref(hf)) <= 1e-5
    assert "Loading checkpoint shards" in capfd.readouterr().err


def test_untied_decoder(tmp_path):
    hf = build_checkpoint(tmp_path / "in", "roberta", seed=9, tie_word_embeddings=False)
    with torch.no_grad():
        hf.lm_head.decoder.weight.add_(0.02 * torch.randn_like(hf.lm_head.decoder.weight))
    hf.save_pretrained(tmp_path / "in")
    with SGLangRobertaForMaskedLM.from_pretrained(tmp_path / "in") as model:
        assert max_abs_diff(model(IDS, attention_mask=MASK).logits, _ref(hf)) <= 1e-5
        model.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "out").eval()
    assert max_abs_diff(_ref(reloaded), _ref(hf)) == 0.0
