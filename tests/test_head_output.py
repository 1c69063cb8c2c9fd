"""forward's logits written by the engine straight into the padded output (engine/head_output.py):
the head runs group by group; every position must still hold transformers' logits, whatever the
padding side, the groups' boundaries or the query-only rows, and a cached answer must own its
tensors."""

from __future__ import annotations

import pytest
import torch
from conftest import max_abs_diff

from sglang_hf_bridge.engine import head_output

TEXTS = ["short", "a somewhat longer sentence here", "mid length one", "x", "another sentence of words"]


def test_groups_are_consecutive_whole_sequences_under_the_row_cap():
    assert head_output.sequence_groups([3, 3, 3, 10, 1, 1], 6) == [[0, 1], [2], [3], [4, 5]]
    assert head_output.sequence_groups([], 6) == []


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("rows_per_group", [1, 7, 10_000])
def test_every_position_holds_transformers_logits(roberta, tokenizer, monkeypatch, side, rows_per_group):
    hf, model = roberta
    row_bytes = model.config.vocab_size * 4
    monkeypatch.setattr(head_output, "HEAD_OUTPUT_BYTES", rows_per_group * row_bytes)
    calls = []
    real_apply = head_output.head_into_destinations

    def counted(*args, **kwargs):
        calls.append(1)
        return real_apply(*args, **kwargs)

    monkeypatch.setattr("sglang_hf_bridge.engine.rank.head_into_destinations", counted)
    tokenizer.padding_side = side
    try:
        enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"
    with torch.no_grad():
        want = hf(**enc).logits
    got = model(**enc).logits
    assert calls, "the engine did not write into the output"
    assert got.is_contiguous() and max_abs_diff(got, want) <= 1e-5


def test_a_cached_answer_owns_its_logits(roberta, tokenizer):
    hf, model = roberta
    enc = tokenizer(TEXTS[:2], return_tensors="pt", padding=True)
    model.enable_result_cache(64)
    try:
        first = model(**enc).logits
        expected = first.clone()
        first.detach().fill_(7.0)  # the caller's output is the caller's to change
        again = model(**enc).logits
        assert model.cache_stats()["result"]["hits"] >= 2
        assert torch.equal(again, expected)
    finally:
        model.disable_result_cache()
