"""compute_mlm_logits equals the matching slices of HF's full logits."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_pools_free, max_abs_diff

from sglang_hf_bridge import InputValidationError

TEXTS = ["The movie was <mask>.", "It was <mask> and <mask>, honestly.", "<mask>"]
LABEL_IDS = [372, 6587]  # " great", " terrible"


@pytest.fixture(scope="module")
def batch(roberta, tokenizer):
    hf, _ = roberta
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = hf(**enc).logits
    return enc, ref


def test_default_positions_are_mask_tokens_row_major(roberta, tokenizer, batch):
    _, model = roberta
    enc, ref = batch
    out = model.compute_mlm_logits(enc["input_ids"], enc["attention_mask"], mask_token_id=tokenizer.mask_token_id)
    expected = ref[enc["input_ids"] == tokenizer.mask_token_id]
    assert out.shape == expected.shape == (4, 50265)
    assert max_abs_diff(out, expected) <= 1e-5
    # vocab_size - 1 is <mask> for RoBERTa's vocabulary: the default finds the same tokens.
    assert max_abs_diff(model.compute_mlm_logits(enc["input_ids"], enc["attention_mask"]), expected) <= 1e-5
    assert_pools_free(model)


def test_label_word_columns(roberta, tokenizer, batch):
    _, model = roberta
    enc, ref = batch
    out = model.compute_mlm_logits(enc["input_ids"], enc["attention_mask"], vocab_ids=LABEL_IDS)
    expected = ref[enc["input_ids"] == tokenizer.mask_token_id][:, LABEL_IDS]
    assert out.shape == (4, 2)
    assert max_abs_diff(out, expected) <= 1e-5


def test_explicit_pairs_keep_their_order(roberta, batch):
    _, model = roberta
    enc, ref = batch
    pairs = torch.tensor([[1, 3], [0, 0], [2, 1], [0, 2]])
    out = model.compute_mlm_logits(enc["input_ids"], enc["attention_mask"], positions=pairs, vocab_ids=LABEL_IDS)
    expected = ref[pairs[:, 0], pairs[:, 1]][:, LABEL_IDS]
    assert max_abs_diff(out, expected) <= 1e-5


def test_bool_positions(roberta, batch):
    _, model = roberta
    enc, ref = batch
    sel = enc["attention_mask"].bool().clone()
    sel[:, 1:] = False
    out = model.compute_mlm_logits(enc["input_ids"], enc["attention_mask"], positions=sel)
    assert max_abs_diff(out, ref[:, 0]) <= 1e-5


def test_bad_positions_and_vocab_ids(roberta, batch):
    _, model = roberta
    enc, _ = batch
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pad_col = int((mask[2] == 0).nonzero()[0])
    with pytest.raises(InputValidationError, match="padded position"):
        model.compute_mlm_logits(ids, mask, positions=[[2, pad_col]])
    with pytest.raises(InputValidationError, match="outside"):
        model.compute_mlm_logits(ids, mask, positions=[[9, 0]])
    with pytest.raises(InputValidationError, match="vocab_ids"):
        model.compute_mlm_logits(ids, mask, vocab_ids=[50265])
    assert model.compute_mlm_logits(ids, mask, positions=torch.zeros((0, 2), dtype=torch.long)).shape == (0, 50265)
    assert_pools_free(model)
