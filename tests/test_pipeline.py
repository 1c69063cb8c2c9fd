"""transformers' fill-mask pipeline gives the same tokens and scores as on HF's own model."""

from __future__ import annotations

import pytest
from transformers import pipeline

SENTENCES = [
    "The movie was <mask>.",
    "I <mask> this film and the <mask> was great.",
    "Paris is the <mask> of France.",
]


def _assert_same(a, b):
    if isinstance(a, dict):
        assert a["token"] == b["token"] and a["sequence"] == b["sequence"]
        assert abs(a["score"] - b["score"]) <= 1e-5
        return
    assert len(a) == len(b)
    for x, y in zip(a, b):
        _assert_same(x, y)


@pytest.fixture(scope="module")
def pipes(roberta, tokenizer):
    hf, model = roberta
    return pipeline("fill-mask", model=hf, tokenizer=tokenizer), pipeline("fill-mask", model=model, tokenizer=tokenizer)


@pytest.mark.parametrize("kwargs", [{}, {"top_k": 10}, {"targets": [" great", " terrible", " fine"]}])
def test_fill_mask_matches_hf(pipes, kwargs):
    ref_pipe, pipe = pipes
    _assert_same(pipe(SENTENCES, **kwargs), ref_pipe(SENTENCES, **kwargs))


def test_fill_mask_batched(pipes):
    ref_pipe, pipe = pipes
    _assert_same(pipe(SENTENCES * 3, batch_size=4, top_k=3), ref_pipe(SENTENCES * 3, batch_size=4, top_k=3))
