"""The "onednn-packed" GEMM path (engine/packed_weights.py): weights packed once into oneDNN's
layout, each copy used only while its weight is unchanged. What it must never do is answer from a
stale copy (MeZO and adapters write weights in place) or let the answer depend on whether the copy
existed yet (caches reuse answers bit for bit)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import max_abs_diff, with_random_lora

from sglang_hf_bridge.engine import gemm
from sglang_hf_bridge.engine.packed_weights import PackedWeights

if gemm.PACKED not in gemm.available_paths("cpu", "float32"):
    pytest.skip("this torch cannot pack oneDNN linear weights", allow_module_level=True)


def test_a_copy_is_made_on_second_sight_and_dropped_by_any_write():
    store = PackedWeights()
    w = torch.randn(48, 16)
    store.next_pass()
    assert store.weight_for(w, 8) is w  # first sight: the plain weight
    assert store.weight_for(w, 8) is w  # the same pass again: still plain, nothing packed yet
    store.next_pass()
    packed = store.weight_for(w, 8)
    assert packed is not w and packed.is_mkldnn and store.packs == 1 and store.nbytes == w.numel() * 4
    assert store.weight_for(w, 8) is packed  # kept
    with torch.no_grad():
        w.add_(1.0)  # an in-place write through the tensor itself: its version counter moved
    assert store.weight_for(w, 8) is w and store.nbytes == 0
    store.next_pass()
    assert store.weight_for(w, 8) is not w and store.packs == 2
    store.dropped()  # a rank operation wrote base weights
    assert store.nbytes == 0 and store.weight_for(w, 8) is w
    assert PackedWeights(single_rows_plain=True).weight_for(w, 1) is w


def test_a_collected_weight_takes_its_copy_with_it():
    store = PackedWeights()
    w = torch.randn(48, 16)
    for _ in range(2):
        store.next_pass()
        store.weight_for(w, 4)
    assert store.nbytes > 0
    del w
    assert store.nbytes == 0 and not store._copies


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_products_equal_plain_ones_where_the_engine_mixes_them(dtype):
    """The engine mixes packed and plain products of one weight version only where they give the
    same bits; on this host's CPU the check runs on roberta-base's shapes, as the engine runs it."""
    name = str(dtype).replace("torch.", "")
    if gemm.PACKED not in gemm.available_paths("cpu", name):
        pytest.skip(f"no packed path in {name}")
    shapes = gemm.checked_shapes(gemm.encoder_linear_shapes({"hidden_size": 768, "intermediate_size": 3072}))
    exact = gemm.packing_exactness(name, shapes)
    store = gemm.packed_weights_for(name, gemm.encoder_linear_shapes({"hidden_size": 768, "intermediate_size": 3072}))
    assert store.single_rows_plain == (not exact["one_row"])
    g = torch.Generator().manual_seed(3)
    w, b = (torch.randn(3072, 768, generator=g) * 0.05).to(dtype), torch.randn(3072, generator=g).to(dtype)
    for rows in (1, 2, 27, 300):
        x = torch.randn(rows, 768, generator=g).to(dtype)
        plain = store.linear(x, w, b)  # first sight: plain
        store.next_pass()
        store.next_pass()
        packed = store.linear(x, w, b)
        if rows > 1 or exact["one_row"]:
            assert store.weight_for(w, rows) is not w
        if exact["batches"]:
            assert torch.equal(plain, packed)
        assert max_abs_diff(plain, torch.nn.functional.linear(x, w, b)) <= (1e-5 if dtype == torch.float32 else 0.05)


def test_a_forced_packed_path_is_refused_where_packing_changes_the_bits(tmp_path, monkeypatch):
    monkeypatch.setenv(gemm.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(gemm.ENV, raising=False)
    monkeypatch.setattr(gemm, "packing_is_exact", lambda *a, **k: False)
    monkeypatch.setattr(gemm, "_EXACTNESS", {})  # nothing this process learnt earlier
    with pytest.raises(ValueError, match="differs in its last bits"):
        gemm.choose("cpu", "float32", [(48, 16), (16, 48)], gemm.PACKED)
    choice = gemm.choose("cpu", "float32", [(48, 16), (16, 48)])
    assert choice.path != gemm.PACKED and gemm.PACKED not in choice.seconds


# ---- on the engine --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packed_model(roberta_checkpoint):
    from sglang_hf_bridge import SGLangRobertaForMaskedLM

    path, hf = roberta_checkpoint
    model = SGLangRobertaForMaskedLM.from_pretrained(path, gemm=gemm.PACKED)
    yield hf, model
    model.close()


def _batch():
    ids = torch.tensor([[0, 31414, 232, 328, 50264, 2], [0, 713, 16, 10, 2, 1], [0, 50264, 2, 1, 1, 1]])
    return {"input_ids": ids, "attention_mask": (ids != 1).long()}


def _moved_hf(model, hf):
    moved = type(hf)(hf.config).eval()
    moved.load_state_dict(model.state_dict(), strict=False)
    return moved


def test_answers_do_not_depend_on_whether_the_copies_exist_yet(packed_model):
    hf, model = packed_model
    store = model.runtime.local.packed_weights
    store.dropped()
    enc = _batch()
    with torch.no_grad():
        first = model(**enc).logits  # every weight plain
        second = model(**enc).logits  # every weight packed now
        one = model.compute_mlm_logits(enc["input_ids"][2:], enc["attention_mask"][2:], mask_token_id=50264)
        one_again = model.compute_mlm_logits(enc["input_ids"][2:], enc["attention_mask"][2:], mask_token_id=50264)
        ref = hf(**enc).logits
    assert store.packs > 0 and torch.equal(first, second) and torch.equal(one, one_again)
    assert max_abs_diff(second, ref) <= 1e-5


def test_a_rank_write_drops_the_copies_and_without_that_answers_would_be_stale(packed_model, monkeypatch):
    from sglang_hf_bridge.engine import rank_perturb_weights, rank_set_hf_tensors

    hf, model = packed_model
    engine, store = model.runtime.local, model.runtime.local.packed_weights
    names = ["roberta.encoder.layer.0.intermediate.dense.weight", "roberta.encoder.layer.1.attention.self.query.weight"]
    enc = _batch()
    for _ in range(2):
        model(**enc)
    assert store.nbytes > 0
    try:
        with monkeypatch.context() as m:  # the bug it avoids: a write the copies do not hear of
            m.setattr(engine, "after_operation", lambda fn, args: None)
            model.runtime.collective_rpc(rank_perturb_weights, names, 5, 0.05)
            with torch.no_grad():
                stale, ref = model(**enc).logits, _moved_hf(model, hf)(**enc).logits
            assert max_abs_diff(stale, ref) > 1e-3
            store.dropped()
        model.runtime.collective_rpc(rank_set_hf_tensors, {n: hf.state_dict()[n] for n in names})  # heard of
        assert store.nbytes == 0
        with torch.no_grad():
            ref = hf(**enc).logits
            for _ in range(2):  # first sight, then new copies
                assert max_abs_diff(model(**enc).logits, ref) <= 1e-5
        assert store.nbytes > 0
    finally:
        store.dropped()


def test_an_in_place_write_through_a_parameter_is_noticed(packed_model):
    hf, model = packed_model
    enc = _batch()
    for _ in range(2):
        model(**enc)
    weight = model.runtime.model.layers[1].mlp.down_proj.weight
    before = model.runtime.local.packed_weights.packs
    with torch.no_grad():
        weight.mul_(1.5)
    try:
        with torch.no_grad():
            ref = _moved_hf(model, hf)(**enc).logits
            assert max_abs_diff(ref, hf(**enc).logits) > 1e-3
            for _ in range(2):
                assert max_abs_diff(model(**enc).logits, ref) <= 1e-5
        assert model.runtime.local.packed_weights.packs == before + 1  # just that weight, packed anew
    finally:
        with torch.no_grad():
            weight.div_(1.5)


def test_mezo_steps_pack_nothing_and_adapters_keep_the_base_copies(packed_model):
    """MeZO writes between every two passes: those passes run plain (a pack used once costs more
    than it gains). Adapter writes leave the base weights -- and their copies -- alone."""
    from peft import LoraConfig

    from sglang_hf_bridge.engine import rank_perturb_weights, rank_set_hf_tensors

    hf, model = packed_model
    store = model.runtime.local.packed_weights
    enc = _batch()
    names = ["roberta.encoder.layer.0.attention.output.dense.weight"]
    model(**enc)
    packs = store.packs
    for sign in (1, -2, 1):
        model.runtime.collective_rpc(rank_perturb_weights, names, 9, sign * 1e-3)
        model(**enc)
    model.runtime.collective_rpc(rank_set_hf_tensors, {n: hf.state_dict()[n] for n in names})  # bit for bit
    model(**enc)
    assert store.packs == packs
    model(**enc)
    assert store.packs > packs  # unchanged since the last pass: packed now
    packs, held = store.packs, store.nbytes
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"])
    peft, state = with_random_lora(copy.deepcopy(hf), config)
    model.load_adapter(adapter_state_dict=state, peft_config=config, adapter_name="kept")
    try:
        assert store.nbytes == held
        with torch.no_grad():
            assert max_abs_diff(model(**enc).logits, peft(**enc).logits) <= 1e-5
        assert store.packs == packs
    finally:
        model.delete_adapter("kept")


def test_task_heads_compute_through_the_packed_path(tmp_path):
    from test_heads import build_task_checkpoint

    from sglang_hf_bridge import SGLangAutoModelForSequenceClassification

    hf = build_task_checkpoint(tmp_path, "roberta", "ForSequenceClassification", num_labels=3, vocab_size=300)
    model = SGLangAutoModelForSequenceClassification.from_pretrained(tmp_path, gemm=gemm.PACKED)
    try:
        ids = torch.tensor([[0, 31, 41, 51, 2], [0, 61, 2, 1, 1]])
        enc = {"input_ids": ids, "attention_mask": (ids != 1).long()}
        head = model.runtime.model.head
        assert head.linear == model.runtime.local.packed_weights.linear
        with torch.no_grad():
            ref = hf(**enc).logits
            for _ in range(2):
                assert max_abs_diff(model(**enc).logits, ref) <= 1e-5
        assert id(head.output.weight) in model.runtime.local.packed_weights._copies
    finally:
        model.close()
