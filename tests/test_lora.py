"""PEFT LoRA adapters run by SGLang's LoRA layers give PEFT-on-transformers' answers."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import assert_pools_free, build_checkpoint, max_abs_diff
from peft import LoraConfig, PeftModel, get_peft_model

from sglang_hf_bridge import SGLangRobertaForMaskedLM

TOL = 1e-5
IDS = torch.tensor([[0, 5, 6, 7, 8, 9, 2], [0, 10, 11, 2, 1, 1, 1], [0, 12, 13, 14, 2, 1, 1], [0, 15, 2, 1, 1, 1, 1]])
MASK = (IDS != 1).long()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora-base")
    hf = build_checkpoint(path, "roberta", seed=11, num_hidden_layers=3)
    model = SGLangRobertaForMaskedLM.from_pretrained(path, max_lora_rank=16, max_loras=6)
    yield path, hf, model
    model.close()


def make_adapter(hf, directory, seed=0, **config):
    """A PEFT adapter with B != 0 (init_lora_weights=False), saved to ``directory``."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(init_lora_weights=False, **config)).eval()
    peft_model.save_pretrained(directory)
    return peft_model


def logits(model, **kw):
    with torch.no_grad():
        return model(IDS, attention_mask=MASK, **kw).logits


@pytest.mark.parametrize(
    "config",
    [
        dict(r=8, lora_alpha=16, target_modules=["query", "value"]),
        dict(r=4, lora_alpha=8, target_modules=["query", "key", "value"]),
        dict(r=8, lora_alpha=8, target_modules=["key"]),
        dict(r=16, lora_alpha=32, target_modules=["attention.output.dense"]),
        dict(r=4, lora_alpha=4, target_modules=["intermediate.dense"]),
        dict(r=8, lora_alpha=16, target_modules=["output.dense"], layers_to_transform=[0, 1, 2]),
        dict(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"], layers_to_transform=[1, 2]),
        dict(r=8, lora_alpha=16, target_modules=r".*\.(query|value|intermediate\.dense)"),
        dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["query", "value", "intermediate.dense"]),
        dict(r=4, lora_alpha=8, target_modules=["value"], layers_to_transform=[2]),
    ],
    ids=["qv-r8", "qkv-r4", "k-only", "attn-out-r16", "intermediate-r4", "output-dense", "all-layers12",
         "regex", "rslora-r16", "v-layer2"],
)
def test_adapter_matches_peft(base, tmp_path, config):
    _, hf, model = base
    peft_model = make_adapter(hf, tmp_path, **config)
    model.load_adapter(tmp_path, adapter_name="t")
    try:
        assert model.active_adapters() == ["t"]
        assert max_abs_diff(logits(model), logits(peft_model)) <= TOL
        assert max_abs_diff(logits(model), logits(hf)) > 10 * TOL  # the adapter really changes outputs
        with torch.no_grad():
            ref = peft_model(IDS, attention_mask=MASK)
            label_pos = MASK.bool()
            cm = model.compute_mlm_logits(IDS, MASK, positions=label_pos, vocab_ids=[5, 50])
        assert max_abs_diff(cm, ref.logits[label_pos][:, [5, 50]]) <= TOL
    finally:
        model.delete_adapter("t")
    assert_pools_free(model)


def test_mixed_batch_three_adapters_and_base_rows(base, tmp_path):
    _, hf, model = base
    peft = {
        "a": make_adapter(hf, tmp_path / "a", 1, r=4, lora_alpha=8, target_modules=["query", "value"]),
        "b": make_adapter(hf, tmp_path / "b", 2, r=8, lora_alpha=16, target_modules=["key", "dense"],
                          layers_to_transform=[1]),
        "c": make_adapter(hf, tmp_path / "c", 3, r=16, lora_alpha=4, use_rslora=True,
                          target_modules=["query", "intermediate.dense", "output.dense"]),
    }
    for name in peft:
        model.load_adapter(tmp_path / name, adapter_name=name)
    try:
        names = ["a", "__base__", "b", "c"]
        out = logits(model, adapter_names=names)
        for row, name in enumerate(names):
            ref = logits(hf) if name == "__base__" else logits(peft[name])
            assert max_abs_diff(out[row], ref[row]) <= TOL, name
        # PEFT's own mixed-batch inference agrees too (all three adapters on one PeftModel)
        mixed = copy.deepcopy(peft["a"])
        for name in ("b", "c"):
            mixed.load_adapter(tmp_path / name, adapter_name=name)
        with torch.no_grad():
            ref = mixed(IDS, attention_mask=MASK, adapter_names=["default", "__base__", "b", "c"]).logits
        assert max_abs_diff(out, ref) <= TOL
        cm = model.compute_mlm_logits(IDS, MASK, positions=[[0, 1], [1, 1], [2, 1], [3, 1]], adapter_names=names)
        assert max_abs_diff(cm, ref[:, 1]) <= TOL
        assert model.engine_pool_stats() == model.engine_pool_capacity()
    finally:
        model.delete_adapter(["a", "b", "c"])


def test_set_disable_enable_delete(base, tmp_path):
    _, hf, model = base
    pa = make_adapter(hf, tmp_path / "a", 4, r=4, lora_alpha=8, target_modules=["query"])
    pb = make_adapter(hf, tmp_path / "b", 5, r=4, lora_alpha=8, target_modules=["value"])
    model.load_adapter(tmp_path / "a", adapter_name="a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    assert model.active_adapters() == ["b"]
    assert max_abs_diff(logits(model), logits(pb)) <= TOL
    model.set_adapter("a")
    assert max_abs_diff(logits(model), logits(pa)) <= TOL
    model.disable_adapters()
    assert model.active_adapters() == []
    assert max_abs_diff(logits(model), logits(hf)) <= TOL
    model.enable_adapters()
    assert max_abs_diff(logits(model), logits(pa)) <= TOL
    model.delete_adapter("a")
    assert model.active_adapters() == ["b"]
    model.delete_adapter("b")
    assert model.active_adapters() == [] and max_abs_diff(logits(model), logits(hf)) <= TOL
    with pytest.raises(ValueError, match="no adapter named 'a'"):
        model.set_adapter("a")


def test_add_adapter_initialised_as_peft(base, tmp_path):
    _, hf, model = base
    model.add_adapter(LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]), adapter_name="fresh")
    try:
        tensors = model.adapter_tensors("fresh")
        assert len(tensors) == 3 * 2 * 2
        assert all(float(t.abs().sum()) == 0 for k, t in tensors.items() if "lora_B" in k)
        assert all(float(t.abs().sum()) > 0 for k, t in tensors.items() if "lora_A" in k)
        assert max_abs_diff(logits(model), logits(hf)) <= TOL  # B = 0: same as base, as in PEFT
        bound = 1 / 64 ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in=64
        assert all(float(t.abs().max()) <= bound for k, t in tensors.items() if "lora_A" in k)
    finally:
        model.delete_adapter("fresh")


def test_add_adapter_with_the_same_seed_gives_peft_tensors(base):
    """add_adapter draws as PEFT draws (module order, nn.Linear's own draws, then the reset): the
    same seed gives bit-identical matrices."""
    _, hf, model = base
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "output.dense"])
    torch.manual_seed(11)
    theirs = {k.replace(".default", ""): v for k, v in get_peft_model(copy.deepcopy(hf), config).state_dict().items()
              if "lora_" in k}
    torch.manual_seed(11)
    model.add_adapter(config, adapter_name="seeded")
    try:
        ours = model.adapter_tensors("seeded")
        assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    finally:
        model.delete_adapter("seeded")


def test_in_place_change_is_seen_by_next_forward(base, tmp_path):
    _, hf, model = base
    peft_model = make_adapter(hf, tmp_path, 6, r=4, lora_alpha=8, target_modules=["query", "value", "output.dense"])
    model.load_adapter(tmp_path, adapter_name="live")
    try:
        ours = model.adapter_tensors("live")
        theirs = {k.replace(".default", ""): v for k, v in peft_model.state_dict().items() if "lora_" in k}
        assert set(ours) <= set(theirs)
        torch.manual_seed(0)
        with torch.no_grad():
            for key, tensor in ours.items():
                noise = torch.randn_like(tensor) * 0.05
                tensor.add_(noise)  # engine memory, in place
                theirs[key].add_(noise)
        assert max_abs_diff(logits(model), logits(peft_model)) <= TOL
        storage = {t.untyped_storage().data_ptr() for t in model.adapter_tensors("live").values()}
        assert storage <= {t.untyped_storage().data_ptr() for t in ours.values()}  # stable, no copies
    finally:
        model.delete_adapter("live")


def test_save_loads_in_plain_peft(base, tmp_path):
    path, hf, model = base
    peft_model = make_adapter(hf, tmp_path / "in", 7, r=8, lora_alpha=16, use_rslora=True,
                              target_modules=["query", "key", "intermediate.dense"], layers_to_transform=[0, 2])
    model.load_adapter(tmp_path / "in", adapter_name="x")
    try:
        model.save_pretrained(tmp_path / "out")
        cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["use_rslora"] is True
        reloaded = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "out").eval()
        assert max_abs_diff(logits(reloaded), logits(peft_model)) == 0.0
        assert max_abs_diff(logits(model), logits(reloaded)) <= TOL
    finally:
        model.delete_adapter("x")


def test_peft_model_wrapping_fails_clearly(base, tmp_path):
    _, hf, model = base
    make_adapter(hf, tmp_path, 8, r=4, lora_alpha=8, target_modules=["query"])
    with pytest.raises(TypeError, match="load_adapter"):
        PeftModel.from_pretrained(model, tmp_path)
    with pytest.raises(TypeError, match="load_adapter"):
        get_peft_model(model, LoraConfig(r=4, target_modules=["query"]))
    assert max_abs_diff(logits(model), logits(hf)) <= TOL


def test_adapter_weights_not_in_base_and_zero_rows_free(base, tmp_path):
    """Adapters never touch the base weights (no merge)."""
    _, hf, model = base
    make_adapter(hf, tmp_path, 9, r=4, lora_alpha=8, target_modules=["query"])
    before = model.runtime.model.layers[0].self_attn.qkv_proj.base_layer.weight.clone()
    model.load_adapter(tmp_path, adapter_name="m")
    logits(model)
    assert torch.equal(model.runtime.model.layers[0].self_attn.qkv_proj.base_layer.weight, before)
    model.delete_adapter("m")
