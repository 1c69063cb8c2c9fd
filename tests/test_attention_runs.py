"""Attention per run of equal-length sequences (sglang_models/attention.py): one SDPA call for
several sequences must give every sequence the very bits its own call gave (caches reuse answers
bit for bit), and a padded batch of such runs must still answer as transformers does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import max_abs_diff

from sglang_hf_bridge.sglang_models import attention

HEADS, DIM = 4, 16


def _one_by_one(q, k, v, lengths, scale):
    """What the engine computed before: one SDPA call per sequence."""
    outs, first = [], 0
    for n in lengths:
        qs, ks, vs = (t[first:first + n].transpose(0, 1) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, scale=scale).transpose(0, 1).reshape(n, -1))
        first += n
    return torch.cat(outs)


@pytest.fixture
def count_calls(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [[5, 5, 5], [3, 7, 7, 7, 2, 2, 9], [1, 1, 40, 40], [33, 33, 33, 33, 33, 65, 65]])
def test_runs_give_each_sequence_its_own_bits(dtype, lengths, count_calls):
    gen = torch.Generator().manual_seed(sum(lengths))
    q, k, v = (torch.randn(sum(lengths), HEADS, DIM, generator=gen).to(dtype) for _ in range(3))
    got = attention.sequence_attention(q, k, v, lengths, 0.25)
    runs = 1 + sum(a != b for a, b in zip(lengths, lengths[1:]))
    assert len(count_calls) == runs < len(lengths)  # grouped: fewer calls than sequences
    assert torch.equal(got, _one_by_one(q, k, v, lengths, 0.25))


def test_a_padded_batch_of_equal_lengths_answers_as_transformers(roberta, tokenizer):
    hf, model = roberta
    texts = ["a b c d", "e f g h", "i j k l", "a much longer sentence than the others here", "m n o p"]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        want = hf(**enc).logits
    got = model(**enc).logits
    assert max_abs_diff(got, want) <= 1e-5
