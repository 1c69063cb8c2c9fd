"""The GEMM behind the engine's linears (engine/gemm.py, compat.route_linear_layers): every path
gives transformers' answers (fp32 <= 1e-5) -- plain, with a LoRA adapter, and after in-place weight
writes (MeZO's, which a stale packed copy would miss) -- the choice is measured once per host and
cached, and a forced path that does not exist is refused. The packed path's own rules are
tests/test_packed_weights.py's; speed is benchmarks/gemm_peak.py's and bench_runtimes.py's."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import max_abs_diff, with_random_lora

from sglang_hf_bridge import compat
from sglang_hf_bridge.engine import gemm
from sglang_hf_bridge.errors import SGLangLayoutError


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.0)])
def test_onednn_linear_is_f_linear(dtype, tol):
    """oneDNN's fp32 product rounds differently from MKL's (relative ~1e-7); in bf16 torch's
    F.linear is oneDNN already."""
    if not compat.onednn_linear_available():
        pytest.skip("this torch has no oneDNN linear")
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g).to(dtype) for s in ((2, 5, 64), (96, 64), (96,)))
    ours = gemm.onednn_linear(x, w, b)
    assert ours.shape == (2, 5, 96) and ours.dtype == dtype
    assert max_abs_diff(ours, F.linear(x, w, b)) <= tol * 64
    w.add_(1.0)  # read as stored: an in-place change is seen by the next call
    assert max_abs_diff(gemm.onednn_linear(x, w, b), F.linear(x, w, b)) <= tol * 64 + 1e-3 * (dtype != torch.float32)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_fused_linear_gelu_is_exact_gelu_of_linear(dtype, tol):
    """GELU fused into oneDNN's epilogue is the erf GELU transformers' RoBERTa/BERT use (not the
    tanh approximation, which differs by ~1e-3)."""
    if "onednn" not in gemm.available_paths("cpu", str(dtype).replace("torch.", "")):
        pytest.skip("no oneDNN linear in this dtype")
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g).to(dtype) for s in ((7, 64), (256, 64), (256,)))
    ref = F.gelu(F.linear(x.float(), w.float(), b.float()))
    ours = gemm.onednn_linear_gelu(x, w, b).float()
    scale = ref.abs().max().item()
    assert max_abs_diff(ours, ref) <= tol * scale
    assert max_abs_diff(F.gelu(ref, approximate="tanh"), ref) > 1e-4  # what a tanh epilogue would miss


def test_choice_is_measured_once_per_host_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv(gemm.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(gemm.ENV, raising=False)
    monkeypatch.setattr(gemm, "_EXACTNESS", {})  # measured afresh into this cache
    shapes = [(48, 16), (16, 48)]
    first = gemm.choose("cpu", "float32", shapes)
    assert first.source in ("measured", "only") and first.path in gemm.available_paths("cpu", "float32")
    if first.source == "measured":
        assert set(first.seconds) == set(gemm.available_paths("cpu", "float32"))
        assert first.path == min(first.seconds, key=first.seconds.get)
        again = gemm.choose("cpu", "float32", list(reversed(shapes)))  # the same shape class
        assert (again.source, again.path) == ("cached", first.path)
        entries = json.loads((tmp_path / "gemm-choice.json").read_text())
        [entry] = [v for k, v in entries.items() if not k.startswith("exact-")]
        assert entry["host"]["cpu"] and entry["shapes"] == [[16, 48], [48, 16]]
        if gemm.PACKED in first.seconds:  # packed vs plain bits checked once, cached beside the choice
            assert [v["batches"] for k, v in entries.items() if k.startswith("exact-")] == [True]
        assert gemm.choose("cpu", "bfloat16", shapes).source == "measured"  # another dtype: measured anew


def test_float16_has_no_onednn_path_on_this_cpu_kind():
    """The bug it avoids: oneDNN's CPU linear has no float16 kernel without AVX512-FP16; choosing it
    made from_pretrained(dtype=float16) fail ("could not create a primitive descriptor")."""
    paths = gemm.available_paths("cpu", "float16")
    x = torch.ones(2, 4, dtype=torch.float16)
    try:
        compat.onednn_linear(x, torch.ones(3, 4, dtype=torch.float16), None)
        assert "onednn" in paths
    except RuntimeError:
        assert paths == ["aten"]
        assert gemm.choose("cpu", "float16", [(8, 4)]).path == "aten"


def test_forced_paths_and_refusals(monkeypatch):
    assert gemm.choose("cpu", "float32", [(8, 8)], "aten").path == "aten"
    assert gemm.choose("cuda", "float32", [(8, 8)]).path == "aten"  # no choice off CPU
    with pytest.raises(ValueError, match="'blas'.*choose one of"):
        gemm.choose("cpu", "float32", [(8, 8)], "blas")
    with pytest.raises(ValueError, match="not available on cuda"):
        gemm.choose("cuda", "float32", [(8, 8)], "onednn")
    monkeypatch.setenv(gemm.ENV, "aten")
    assert gemm.choose("cpu", "float32", [(8, 8)]).source == "forced"


def test_routing_refuses_a_layer_it_does_not_know():
    """The bug it avoids: a quantized layer's packed weight fed to a plain GEMM computes garbage
    without an error; such a layer is refused instead."""
    from sglang.srt.layers.linear import ReplicatedLinear

    layer = ReplicatedLinear(8, 8, bias=True)
    assert compat.route_linear_layers(torch.nn.ModuleDict({"a": layer}), F.linear) == 1
    assert compat.route_linear_layers(torch.nn.ModuleDict({"a": layer}), F.linear) == 1  # routed again: fine
    layer.quant_method = object()
    with pytest.raises(SGLangLayoutError, match="a computes through object"):
        compat.route_linear_layers(torch.nn.ModuleDict({"a": layer}), F.linear)


@pytest.fixture(scope="module", params=["aten", "onednn", "onednn-packed"])
def routed(request, roberta_checkpoint):
    from sglang_hf_bridge import SGLangRobertaForMaskedLM

    if request.param not in gemm.available_paths("cpu", "float32"):
        pytest.skip(f"{request.param} is not available with this torch")
    path, hf = roberta_checkpoint
    model = SGLangRobertaForMaskedLM.from_pretrained(path, gemm=request.param)
    yield request.param, hf, model
    model.close()


def _batch():
    ids = torch.tensor([[0, 31414, 232, 328, 50264, 2], [0, 713, 16, 10, 2, 1]])
    return {"input_ids": ids, "attention_mask": (ids != 1).long()}


def test_each_path_gives_transformers_answers(routed):
    path, hf, model = routed
    assert model.runtime.gemm_choice.path == path and model.runtime.config.gemm == path
    from sglang.srt.layers.linear import LinearBase

    linears = [m for m in model.runtime.model.modules() if isinstance(m, LinearBase)]
    assert linears and all(type(m.quant_method).__name__ == ("UnquantizedLinearMethod" if path == "aten"
                                                            else "RoutedLinearMethod") for m in linears)
    mlp = model.runtime.model.layers[0].mlp  # the up-projection with GELU fused where the path has it
    packed = model.runtime.local.packed_weights
    assert (packed is not None) == (path == gemm.PACKED) and not compat.lora_layer_active(mlp.fc_in)
    assert mlp.linear_gelu == gemm.path_functions(path, packed)[1]
    enc = _batch()
    with torch.no_grad():
        ref = hf(**enc)
    for _ in range(2):  # the packed path: plain weights at first sight, packed copies the second time
        assert max_abs_diff(model(**enc).logits, ref.logits) <= 1e-5
    if packed is not None:
        assert packed.packs > 0 and packed.nbytes > 0


def test_each_path_with_a_lora_adapter(routed):
    from peft import LoraConfig

    path, hf, model = routed
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "intermediate.dense", "output.dense"])
    peft, state = with_random_lora(hf, config)
    model.load_adapter(adapter_state_dict=state, peft_config=config, adapter_name="g")
    try:
        enc = _batch()
        with torch.no_grad():
            ref = peft(**enc)
        assert max_abs_diff(model(**enc).logits, ref.logits) <= 1e-5
    finally:
        peft.unload()
        model.delete_adapter("g")


def test_each_path_sees_in_place_weight_writes(routed):
    """MeZO perturbs the engine's weights in place; the next pass must use the new values."""
    from sglang_hf_bridge.engine import rank_perturb_weights

    path, hf, model = routed
    names = ["roberta.encoder.layer.0.intermediate.dense.weight", "lm_head.dense.weight"]
    for _ in range(2):
        model(**_batch())  # the packed path has copies of every weight now
    model.runtime.collective_rpc(rank_perturb_weights, names, 7, 0.05)
    try:
        state = model.state_dict()
        moved = type(hf)(hf.config).eval()
        moved.load_state_dict(state, strict=False)
        enc = _batch()
        with torch.no_grad():
            ref = moved(**enc)
        assert max_abs_diff(state[names[0]], hf.state_dict()[names[0]]) > 1e-3  # the write happened
        for _ in range(2):  # first sight of the new weights, then their new packed copies
            assert max_abs_diff(model(**enc).logits, ref.logits) <= 1e-5
    finally:
        model.runtime.collective_rpc(rank_perturb_weights, names, 7, -0.05)
