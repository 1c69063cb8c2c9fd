"""PEFT adapters that bring their own task head (SEQ_CLS / TOKEN_CLS adapters save the classifier
beside the LoRA matrices: ``modules_to_save``), per row: a batch whose rows name different
adapters runs each row through its adapter's LoRA and its own head, equal to PEFT row by row;
what the engine saves PEFT loads back."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import max_abs_diff
from peft import LoraConfig, PeftModel, get_peft_model
from test_heads import build_task_checkpoint, padded_batch

import sglang_hf_bridge as bridge
from sglang_hf_bridge.errors import UnsupportedAdapterError

TOL = 1e-5
TASK = {"ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS"}


def peft_adapter(hf, task_type: str, seed: int, directory):
    """A PEFT adapter on transformers' model: random LoRA matrices and a perturbed copy of the head."""
    torch.manual_seed(seed)
    config = LoraConfig(task_type=task_type, r=4, lora_alpha=8, target_modules=["query", "value"],
                        init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(hf), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.5)
    model.eval()
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module", params=[("roberta", "ForSequenceClassification"), ("bert", "ForTokenClassification"),
                                        ("bert", "ForSequenceClassification")], ids=lambda p: f"{p[0]}-{p[1]}")
def adapters(request, tmp_path_factory):
    family, suffix = request.param
    root = tmp_path_factory.mktemp(f"heads-lora-{family}{suffix}")
    hf = build_task_checkpoint(root / "base", family, suffix, seed=3, num_labels=3)
    peft_a = peft_adapter(hf, TASK[suffix], 11, root / "a")
    peft_b = peft_adapter(hf, TASK[suffix], 12, root / "b")
    model = getattr(bridge, f"SGLang{'Bert' if family == 'bert' else 'Roberta'}{suffix}").from_pretrained(
        root / "base", device="cpu")
    model.load_adapter(root / "a", adapter_name="a")
    model.load_adapter(root / "b", adapter_name="b")
    yield hf, peft_a, peft_b, model, family, suffix, root
    model.close()


def test_rows_run_their_own_adapter_and_head(adapters):
    hf, peft_a, peft_b, model, family, suffix, _ = adapters
    enc = padded_batch(family)
    out = model(**enc, adapter_names=["a", "__base__", "b"]).logits
    with torch.no_grad():
        refs = [peft_a(**enc).logits, hf(**enc).logits, peft_b(**enc).logits]
    for row, ref in enumerate(refs):
        assert max_abs_diff(out[row], ref[row]) <= TOL, row
    # the adapters' heads really differ from the model's
    assert max_abs_diff(refs[0][0], refs[1][0]) > 1e-3
    assert model.engine_pool_stats() == model.engine_pool_capacity()


def test_save_adapter_round_trips_through_peft(adapters, tmp_path):
    hf, peft_a, _, model, family, suffix, _ = adapters
    model.save_adapter(tmp_path / "saved", adapter_name="a")
    back = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "saved").eval()
    enc = padded_batch(family)
    with torch.no_grad():
        assert max_abs_diff(back(**enc).logits, peft_a(**enc).logits) <= TOL
    tensors = model.adapter_tensors("a")
    assert any(k.startswith("base_model.model.classifier.") for k in tensors)


def test_add_adapter_starts_from_the_models_head(adapters):
    hf, _, _, model, family, suffix, _ = adapters
    # as transformers' add_adapter: the head is the adapter's own only when modules_to_save says so
    model.add_adapter(LoraConfig(task_type=TASK[suffix], r=2, target_modules=["query"], modules_to_save=["classifier"]),
                      adapter_name="fresh")
    try:
        enc = padded_batch(family)
        with torch.no_grad():
            ref = hf(**enc).logits
        assert max_abs_diff(model(**enc, adapter_names=["fresh"] * 3).logits, ref) <= TOL
        head = {k: v for k, v in model.adapter_tensors("fresh").items() if "classifier" in k}
        assert head
        with torch.no_grad():  # an in-place edit of the adapter's head is what the next call uses
            next(iter(head.values())).add_(1.0)
        assert max_abs_diff(model(**enc, adapter_names=["fresh"] * 3).logits, ref) > 1e-3
        assert max_abs_diff(model(**enc, adapter_names=["__base__"] * 3).logits, ref) <= TOL  # base head untouched
    finally:
        model.delete_adapter("fresh")


def test_modules_to_save_on_the_encoder_is_refused(adapters):
    _, _, _, model, *_ = adapters
    with pytest.raises(UnsupportedAdapterError, match="modules_to_save"):
        model.add_adapter(LoraConfig(r=2, target_modules=["query"], modules_to_save=["output.dense"]), "bad")
    assert "bad" not in model.peft_config


def test_result_cache_is_keyed_by_each_rows_head(adapters):
    """With the result cache on, a row's cached answer belongs to its adapter (LoRA and head):
    an edit of the adapter's own head is never answered from the cache."""
    hf, peft_a, _, model, family, suffix, _ = adapters
    enc = padded_batch(family)
    model.enable_result_cache(16)
    try:
        first = model(**enc, adapter_names=["a", "__base__", "b"]).logits
        again = model(**enc, adapter_names=["a", "__base__", "b"]).logits
        assert torch.equal(first, again) and model.cache_stats()["result"]["hits"] >= 3
        head = next(v for k, v in model.adapter_tensors("a").items() if "classifier" in k and k.endswith("bias"))
        with torch.no_grad():
            head.add_(1.0)
        try:
            edited = model(**enc, adapter_names=["a", "__base__", "b"]).logits
            assert max_abs_diff(edited[0], first[0]) > 0.5 and torch.equal(edited[1:], first[1:])
        finally:
            with torch.no_grad():
                head.sub_(1.0)
    finally:
        model.disable_result_cache()
