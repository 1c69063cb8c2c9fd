"""Forward parity with transformers on the same weights (fp32 CPU: max abs diff <= 1e-5)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_pools_free, build_checkpoint, max_abs_diff

TOL = 1e-5
TEXTS = [
    "The movie was <mask>.",
    "A much longer sentence about a <mask> film that I <mask> watched yesterday with friends.",
    "Short <mask>",
]


def _compare(hf, model, enc, labels=None, hidden=True):
    with torch.no_grad():
        ref = hf(**enc, labels=labels, output_hidden_states=hidden)
    out = model(**enc, labels=labels, output_hidden_states=hidden)
    assert out.logits.shape == ref.logits.shape
    assert max_abs_diff(out.logits, ref.logits) <= TOL
    if labels is not None:
        assert abs(out.loss.item() - ref.loss.item()) <= TOL
    if hidden:
        assert len(out.hidden_states) == len(ref.hidden_states)
        for a, b in zip(out.hidden_states, ref.hidden_states):
            assert max_abs_diff(a, b) <= TOL
    return out, ref


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_hf_everywhere_including_padding(roberta, tokenizer, side):
    hf, model = roberta
    tokenizer.padding_side = side
    try:
        enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"
    assert (enc["attention_mask"] == 0).any()
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    _compare(hf, model, dict(enc), labels=labels)
    assert_pools_free(model)


def test_variable_lengths_one_by_one_and_batched(roberta):
    hf, model = roberta
    torch.manual_seed(1)
    for n in (1, 2, 7, 33, 127):
        ids = torch.randint(3, 50265, (1, n))
        _compare(hf, model, {"input_ids": ids}, hidden=False)


def test_labels_loss_over_all_positions(roberta, tokenizer):
    hf, model = roberta
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    labels = torch.full_like(enc["input_ids"], -100)
    labels[:, 1] = enc["input_ids"][:, 1]
    labels[enc["input_ids"] == tokenizer.mask_token_id] = 372
    out, ref = _compare(hf, model, dict(enc), labels=labels, hidden=False)
    assert out.loss.ndim == 0


def test_token_type_and_explicit_position_ids(roberta, tokenizer):
    hf, model = roberta
    enc = tokenizer(TEXTS[:2], return_tensors="pt", padding=True)
    pos = torch.arange(enc["input_ids"].shape[1]).unsqueeze(0) + 2
    enc = dict(enc, token_type_ids=torch.zeros_like(enc["input_ids"]), position_ids=pos)
    _compare(hf, model, enc, hidden=False)


def test_non_contiguous_attention_mask(roberta, tokenizer):
    hf, model = roberta
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    mask = enc["attention_mask"].clone()
    mask[0, 2] = 0  # hide a real token in the middle of a row
    _compare(hf, model, {"input_ids": enc["input_ids"], "attention_mask": mask}, hidden=False)


def test_return_dict_false_gives_tuple(roberta, tokenizer):
    hf, model = roberta
    enc = tokenizer(TEXTS[:1], return_tensors="pt")
    labels = enc["input_ids"]
    loss, logits = model(**enc, labels=labels, return_dict=False)
    with torch.no_grad():
        ref = hf(**enc, labels=labels)
    assert max_abs_diff(logits, ref.logits) <= TOL
    assert abs(loss.item() - ref.loss.item()) <= TOL


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("xlm-roberta", {}),
        ("camembert", {"vocab_size": 32005}),
        ("roberta", {"hidden_size": 60, "num_attention_heads": 5, "intermediate_size": 96}),  # odd heads
        ("roberta", {"hidden_size": 63, "num_attention_heads": 3, "num_hidden_layers": 3}),
    ],
)
def test_families_and_head_counts(tmp_path, family, overrides):
    from sglang_hf_bridge import SGLangRobertaForMaskedLM

    hf = build_checkpoint(tmp_path, family, seed=3, **overrides)
    torch.manual_seed(0)
    V = hf.config.vocab_size
    ids = torch.randint(3, V, (3, 21))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = 1
    with SGLangRobertaForMaskedLM.from_pretrained(tmp_path) as model:
        assert model.config.model_type == family
        _compare(hf, model, {"input_ids": ids, "attention_mask": mask})


def test_batch_bigger_than_pools_is_split_with_same_results(roberta_checkpoint):
    from sglang_hf_bridge import SGLangRobertaForMaskedLM

    path, hf = roberta_checkpoint
    torch.manual_seed(5)
    ids = torch.randint(3, 50265, (12, 60))
    mask = torch.ones_like(ids)
    for i in range(12):
        mask[i, 30 + 2 * i :] = 0
    ids[mask == 0] = 1
    with SGLangRobertaForMaskedLM.from_pretrained(path, max_num_tokens=128, max_running_requests=3) as model:
        from sglang_hf_bridge.engine.scheduler import plan_chunks

        lengths = mask.sum(1).tolist()
        assert len(plan_chunks(lengths, 128, 3)) > 3  # really split
        _compare(hf, model, {"input_ids": ids, "attention_mask": mask}, hidden=False)
        assert_pools_free(model)


def test_sglang_attention_backend_path_gives_the_same_answers(roberta_checkpoint, tokenizer):
    """``encoder_attention="backend"``: attention through SGLang's torch_native backend (K/V written
    to the KV pool, read back per request) instead of the model's own per-sequence SDPA (the
    default). Both match transformers; only the backend path touches the KV pool."""
    from sglang_hf_bridge import SGLangRobertaForMaskedLM

    path, hf = roberta_checkpoint
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    outputs = {}
    for mode in ("sdpa", "backend"):
        with SGLangRobertaForMaskedLM.from_pretrained(path, encoder_attention=mode) as model:
            assert model.runtime.config.encoder_attention == mode
            k_pool = model.runtime.model_runner.token_to_kv_pool.get_key_buffer(0)
            if mode == "backend":
                k_pool.zero_()
            else:  # nothing reads or writes the pool: it holds no memory (compat.release_unread_kv_memory)
                assert k_pool.is_meta
            outputs[mode], _ = _compare(hf, model, dict(enc), hidden=False)
            if mode == "backend":
                assert bool(k_pool.any())  # the backend wrote K/V there
            assert_pools_free(model)
    assert max_abs_diff(outputs["sdpa"].logits, outputs["backend"].logits) <= 1e-6
    with SGLangRobertaForMaskedLM.from_pretrained(path, attention_backend="torch_native") as model:
        assert model.runtime.config.encoder_attention == "backend"  # naming a backend means "use it"
    with pytest.raises(ValueError, match="encoder_attention"):
        SGLangRobertaForMaskedLM.from_pretrained(path, encoder_attention="flash")
