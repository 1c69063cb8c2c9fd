"""Checkpoint shapes users really have: FFN widths SGLang pads on CPU (37, 20, 1200, TinyBERT-like
312/1200/12 heads), at tp_size 1 and 2. Everything that reads or writes engine weights -- forward,
save_pretrained, MeZO's HF-named views, LoRA on the FFN, TP gathers -- sees the checkpoint's
shapes, never SGLang's padding."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_pools_free, build_checkpoint, max_abs_diff
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM

from sglang_hf_bridge import SGLangRobertaForMaskedLM
from sglang_hf_bridge.engine import hf_parameter_slices

TOL = 1e-5
IDS = torch.tensor([[0, 5, 6, 7, 8, 9, 2], [0, 10, 11, 2, 1, 1, 1], [0, 12, 13, 14, 2, 1, 1]])
MASK = (IDS != 1).long()
FFN_LORA = dict(r=4, lora_alpha=8, target_modules=["query", "intermediate.dense", "output.dense"],
                init_lora_weights=False)


def _logits(model, **kw):
    with torch.no_grad():
        return model(IDS, attention_mask=MASK, **kw).logits


def _check_checkpoint_shapes(model, hf, tmp_path):
    """Engine -> HF checkpoint -> transformers: identical answers, the checkpoint's shapes."""
    model.save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    reference = hf.state_dict()
    for name, tensor in saved.items():
        assert tuple(tensor.shape) == tuple(reference[name].shape), name
        assert torch.equal(tensor, reference[name]), name
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        assert max_abs_diff(reloaded(IDS, attention_mask=MASK).logits, hf(IDS, attention_mask=MASK).logits) == 0.0


def _check_mezo_perturbation(model, hf):
    """Full-parameter MeZO's z lands on the same (real) weights on the engine and on transformers."""
    from sglang_hf_bridge.training.zo import EngineWeightsTarget, TorchParametersTarget

    ref = copy.deepcopy(hf)
    engine_target, torch_target = EngineWeightsTarget(model), TorchParametersTarget(ref)
    assert engine_target.names == torch_target.names
    for target in (engine_target, torch_target):
        target.perturb(3, 1e-2)
    with torch.no_grad():
        assert max_abs_diff(_logits(model), ref(IDS, attention_mask=MASK).logits) <= TOL
    engine_target.perturb(3, -1e-2)
    assert max_abs_diff(_logits(model), hf(IDS, attention_mask=MASK).logits.detach()) <= TOL


def _check_lora_on_ffn(model, hf, tmp_path):
    torch.manual_seed(5)
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(**FFN_LORA)).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    model.load_adapter(tmp_path / "adapter", adapter_name="ffn")
    try:
        with torch.no_grad():
            ref = peft_model(IDS, attention_mask=MASK).logits
        assert max_abs_diff(_logits(model), ref) <= TOL
        expected = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
        state = model.adapter_state_dict("ffn")
        assert set(state) == set(expected)
        for name, tensor in expected.items():
            assert tuple(state[name].shape) == tuple(tensor.shape), name
            assert torch.equal(state[name], tensor), name
        if model.runtime.config.tp_size == 1:  # views of the engine's pool: the real part only
            views = model.adapter_tensors("ffn")
            assert {n: tuple(v.shape) for n, v in views.items()} == {n: tuple(t.shape) for n, t in expected.items()}
        model.save_adapter(tmp_path / "saved-adapter", "ffn")
        again = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "saved-adapter").eval()
        with torch.no_grad():
            assert max_abs_diff(again(IDS, attention_mask=MASK).logits, ref) == 0.0
    finally:
        model.delete_adapter("ffn")


@pytest.mark.parametrize("intermediate", [37, 1200])
def test_unaligned_ffn_width_single_rank(tmp_path, intermediate):
    hf = build_checkpoint(tmp_path / "ckpt", "roberta", seed=40, intermediate_size=intermediate)
    with SGLangRobertaForMaskedLM.from_pretrained(tmp_path / "ckpt") as model:
        with torch.no_grad():
            ref = hf(IDS, attention_mask=MASK, output_hidden_states=True)
        out = model(IDS, attention_mask=MASK, output_hidden_states=True)
        assert max_abs_diff(out.logits, ref.logits) <= TOL
        assert all(max_abs_diff(a, b) <= TOL for a, b in zip(out.hidden_states, ref.hidden_states))
        # MeZO's HF-named views have the checkpoint's shapes and values, padding excluded.
        params = dict(hf.named_parameters())
        for name, s in hf_parameter_slices(model.runtime.model).items():
            assert s.full_shape == tuple(params[name].shape), name
            assert torch.equal(s.view, params[name].detach()[s.index]), name
        _check_checkpoint_shapes(model, hf, tmp_path)
        _check_lora_on_ffn(model, hf, tmp_path)
        _check_mezo_perturbation(model, hf)
        assert_pools_free(model)


@pytest.mark.parametrize("intermediate", [37, 20])
def test_unaligned_ffn_width_two_ranks(tmp_path, intermediate):
    """tp=2 pads to 64: rank 1 holds 5 real FFN rows (37) or none at all (20)."""
    hf = build_checkpoint(tmp_path / "ckpt", "roberta", seed=41, intermediate_size=intermediate)
    with SGLangRobertaForMaskedLM.from_pretrained(tmp_path / "ckpt", tp_size=2) as model:
        assert max_abs_diff(_logits(model), hf(IDS, attention_mask=MASK).logits.detach()) <= TOL
        _check_checkpoint_shapes(model, hf, tmp_path)
        _check_lora_on_ffn(model, hf, tmp_path)
        _check_mezo_perturbation(model, hf)
        assert model.engine_pool_stats() == model.engine_pool_capacity()


def test_tinybert_shape(tmp_path):
    """TinyBERT-4's public sizes (hidden 312, 12 heads of 26, FFN 1200, 4 layers) as a RoBERTa."""
    hf = build_checkpoint(tmp_path / "ckpt", "roberta", seed=42, hidden_size=312, num_attention_heads=12,
                          intermediate_size=1200, num_hidden_layers=4)
    with SGLangRobertaForMaskedLM.from_pretrained(tmp_path / "ckpt") as model:
        assert max_abs_diff(_logits(model), hf(IDS, attention_mask=MASK).logits.detach()) <= TOL
