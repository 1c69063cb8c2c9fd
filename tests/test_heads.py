"""Every task head on the engine equals transformers' class on the same weights (fp32 <= 1e-5):
sequence classification (RoBERTa's head at <s>, BERT's pooler + classifier), token
classification, question answering and the base model, for RoBERTa and BERT, on right- and
left-padded batches; losses for every problem type; the Auto classes; a new head initialised
exactly as transformers initialises it."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import max_abs_diff, small_config

import sglang_hf_bridge as bridge
from sglang_hf_bridge.errors import CheckpointError, InputValidationError

TOL = 1e-5
HEADS = {  # face suffix -> (our class suffix, config overrides)
    "ForSequenceClassification": {"num_labels": 3},
    "ForTokenClassification": {"num_labels": 5},
    "ForQuestionAnswering": {},
    "Model": {},
}
FAMILY_CONFIG = {"roberta": "RobertaConfig", "bert": "BertConfig"}
PREFIX = {"roberta": "Roberta", "bert": "Bert"}


def bert_config(**overrides):
    kwargs = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=64, type_vocab_size=2, pad_token_id=0)
    kwargs.update(overrides)
    return transformers.BertConfig(**kwargs)


def family_config(family: str, **overrides):
    return bert_config(**overrides) if family == "bert" else small_config("roberta", **overrides)


def build_task_checkpoint(directory, family: str, suffix: str, seed: int = 0, **overrides):
    """transformers' ``{Family}{suffix}`` with random weights (LayerNorms and biases perturbed so
    every parameter matters), saved to ``directory``; returns it in eval mode."""
    torch.manual_seed(seed)
    hf = getattr(transformers, f"{PREFIX[family]}{suffix}")(family_config(family, **overrides)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(directory)
    return hf


def padded_batch(family: str, left: bool = False, seed: int = 1):
    """Three rows of 9, 6 and 3 real tokens (pad id per family), right- or left-padded, with
    token types for BERT."""
    g = torch.Generator().manual_seed(seed)
    pad = 0 if family == "bert" else 1
    ids = torch.randint(5, 900, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    for row, n in ((1, 6), (2, 3)):
        cols = slice(0, 9 - n) if left else slice(n, 9)
        mask[row, cols] = 0
        ids[row, cols] = pad
    enc = {"input_ids": ids, "attention_mask": mask}
    if family == "bert":
        types = torch.zeros_like(ids)
        types[0, 5:] = 1
        enc["token_type_ids"] = types
    return enc


@pytest.fixture(scope="module", params=[(f, s) for f in ("roberta", "bert") for s in HEADS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def task_pair(request, tmp_path_factory):
    """(HF model, engine model, family, suffix) on the same random weights."""
    family, suffix = request.param
    path = tmp_path_factory.mktemp(f"{family}{suffix}")
    hf = build_task_checkpoint(path, family, suffix, **HEADS[suffix])
    model = getattr(bridge, f"SGLang{PREFIX[family]}{suffix}").from_pretrained(path, device="cpu")
    yield hf, model, family, suffix
    model.close()


def _outputs(out, suffix):
    if suffix == "ForQuestionAnswering":
        return [out.start_logits, out.end_logits]
    if suffix == "Model":
        return [out.last_hidden_state, out.pooler_output]
    return [out.logits]


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_outputs_and_hidden_states_match_transformers(task_pair, left):
    hf, model, family, suffix = task_pair
    enc = padded_batch(family, left)
    with torch.no_grad():
        ref = hf(**enc, output_hidden_states=True)
    out = model(**enc, output_hidden_states=True)
    for a, b in zip(_outputs(out, suffix), _outputs(ref, suffix)):
        assert a.shape == b.shape and max_abs_diff(a, b) <= TOL
    assert len(out.hidden_states) == len(ref.hidden_states)
    assert all(max_abs_diff(a, b) <= TOL for a, b in zip(out.hidden_states, ref.hidden_states))
    # without hidden states: the head's rows only (sequence heads: the first token of each row)
    plain = model(**enc)
    for a, b in zip(_outputs(plain, suffix), _outputs(ref, suffix)):
        assert max_abs_diff(a, b) <= TOL
    assert model.engine_pool_stats() == model.engine_pool_capacity()


def test_losses_and_tuples_match_transformers(task_pair):
    hf, model, family, suffix = task_pair
    enc = padded_batch(family)
    if suffix == "ForSequenceClassification":
        kw = {"labels": torch.tensor([0, 2, 1])}
    elif suffix == "ForTokenClassification":
        labels = torch.randint(0, 5, (3, 9), generator=torch.Generator().manual_seed(3))
        labels[enc["attention_mask"] == 0] = -100
        kw = {"labels": labels}
    elif suffix == "ForQuestionAnswering":
        kw = {"start_positions": torch.tensor([1, 4, 20]), "end_positions": torch.tensor([[3], [5], [2]])}
    else:
        kw = {}
    with torch.no_grad():
        ref = hf(**enc, **kw, return_dict=False)
    out = model(**enc, **kw, return_dict=False)
    assert isinstance(out, tuple) and len(out) == len(ref)
    for a, b in zip(out, ref):
        assert max_abs_diff(a, b) <= TOL


def test_state_dict_and_save_round_trip(task_pair, tmp_path):
    hf, model, family, suffix = task_pair
    ref = hf.state_dict()
    ours = model.state_dict()
    assert set(ours) == set(ref) - {k for k in ref if k.endswith(("position_ids", "token_type_ids"))}
    assert all(max_abs_diff(ours[k], ref[k]) == 0 for k in ours)
    model.save_pretrained(tmp_path)
    back = getattr(transformers, f"{PREFIX[family]}{suffix}").from_pretrained(tmp_path).eval()
    assert back.config.architectures == [f"{PREFIX[family]}{suffix}"]
    assert all(max_abs_diff(back.state_dict()[k], v) == 0 for k, v in ours.items())


def test_bad_labels_are_named_and_the_model_stays_usable(task_pair):
    hf, model, family, suffix = task_pair
    enc = padded_batch(family)
    if suffix == "ForSequenceClassification":
        with pytest.raises(InputValidationError, match="class id"):
            model(**enc, labels=torch.tensor([0, 7, 1]))
    elif suffix == "ForTokenClassification":
        with pytest.raises(InputValidationError, match="label 9"):
            model(**enc, labels=torch.full((3, 9), 9))
    else:
        with pytest.raises(TypeError, match="unexpected keyword"):
            model(**enc, labelz=1)
    with torch.no_grad():
        ref = hf(**enc)
    assert max_abs_diff(_outputs(model(**enc), suffix)[0], _outputs(ref, suffix)[0]) <= TOL


# ---------------------------------------------------------------------- problem types, Auto classes
@pytest.fixture(scope="module")
def regression_pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("regression")
    hf = build_task_checkpoint(path, "roberta", "ForSequenceClassification", num_labels=1)
    model = bridge.SGLangAutoModelForSequenceClassification.from_pretrained(path, device="cpu")
    yield hf, model
    model.close()


def test_regression_and_multi_label_losses(regression_pair, task_pair):
    hf, model = regression_pair
    enc = padded_batch("roberta")
    labels = torch.tensor([0.5, -1.0, 2.0])
    with torch.no_grad():
        ref = hf(**enc, labels=labels)
    out = model(**enc, labels=labels)
    assert model.config.problem_type == hf.config.problem_type == "regression"
    assert abs(out.loss.item() - ref.loss.item()) <= TOL
    hf3, model3, family, suffix = task_pair
    if suffix != "ForSequenceClassification":
        return
    enc = padded_batch(family)
    multi = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    for m in (hf3, model3):
        m.config.problem_type = "multi_label_classification"
    try:
        with torch.no_grad():
            ref = hf3(**enc, labels=multi)
        assert abs(model3(**enc, labels=multi).loss.item() - ref.loss.item()) <= TOL
    finally:
        for m in (hf3, model3):
            m.config.problem_type = None


def test_auto_classes_pick_the_family_class(regression_pair, tmp_path):
    _, model = regression_pair
    assert type(model) is bridge.SGLangRobertaForSequenceClassification
    for family, config_cls in (("xlm-roberta", transformers.XLMRobertaConfig),
                               ("camembert", transformers.CamembertConfig), ("bert", transformers.BertConfig)):
        path = tmp_path / family
        path.mkdir()
        config_cls(**(family_config("bert" if family == "bert" else "roberta").to_diff_dict())).save_pretrained(path)
        for auto, suffix in ((bridge.SGLangAutoModelForSequenceClassification, "ForSequenceClassification"),
                             (bridge.SGLangAutoModelForTokenClassification, "ForTokenClassification"),
                             (bridge.SGLangAutoModelForQuestionAnswering, "ForQuestionAnswering"),
                             (bridge.SGLangAutoModel, "Model")):
            cls = auto.class_for(str(path))
            assert cls.config_class is config_cls
            assert cls.hf_model_class == config_cls.__name__.replace("Config", suffix)


@pytest.mark.parametrize("family", ["xlm-roberta", "camembert"])
def test_xlm_roberta_and_camembert_task_classes_match_transformers(family, tmp_path):
    """The RoBERTa-family twins: each config class's task checkpoints load through the Auto classes
    into the twin's class and answer as transformers' class does."""
    prefix = {"xlm-roberta": "XLMRoberta", "camembert": "Camembert"}[family]
    config = getattr(transformers, f"{prefix}Config")(**small_config("roberta", num_labels=3).to_diff_dict())
    for suffix, auto in (("ForSequenceClassification", bridge.SGLangAutoModelForSequenceClassification),
                         ("ForTokenClassification", bridge.SGLangAutoModelForTokenClassification)):
        path = tmp_path / suffix
        torch.manual_seed(4)
        hf = getattr(transformers, f"{prefix}{suffix}")(config).eval()
        hf.save_pretrained(path)
        model = auto.from_pretrained(path, device="cpu")
        try:
            assert type(model).__name__ == f"SGLang{prefix}{suffix}"
            enc = padded_batch("roberta")
            with torch.no_grad():
                ref = hf(**enc).logits
            assert max_abs_diff(model(**enc).logits, ref) <= TOL
        finally:
            model.close()


# ---------------------------------------------------------------------- a new head, as run_glue starts
@pytest.mark.parametrize("family", ["roberta", "bert"])
def test_new_head_initialised_as_transformers_does(family, tmp_path):
    """A masked-LM checkpoint loaded into a classifier with num_labels=4: the head (BERT: and the
    pooler the MLM checkpoint lacks) is initialised with the same draws as transformers' under the
    same seed, reported in missing_keys; the answers then match."""
    base = tmp_path / "base"
    build_task_checkpoint(base, family, "ForMaskedLM")
    torch.manual_seed(1234)
    ref, ref_info = getattr(transformers, f"{PREFIX[family]}ForSequenceClassification").from_pretrained(
        base, num_labels=4, output_loading_info=True)
    ref.eval()
    torch.manual_seed(1234)
    model, info = getattr(bridge, f"SGLang{PREFIX[family]}ForSequenceClassification").from_pretrained(
        base, num_labels=4, output_loading_info=True, device="cpu")
    try:
        assert set(info["missing_keys"]) == set(ref_info["missing_keys"]) and info["missing_keys"]
        ours = model.state_dict()
        for key in ref_info["missing_keys"]:
            assert torch.equal(ours[key], ref.state_dict()[key]), key
        enc = padded_batch(family)
        with torch.no_grad():
            expected = ref(**enc).logits
        assert max_abs_diff(model(**enc).logits, expected) <= TOL
        assert model.config.num_labels == 4
    finally:
        model.close()


def test_missing_encoder_tensors_stay_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    build_task_checkpoint(tmp_path, "roberta", "ForSequenceClassification", num_labels=2)
    state = load_file(tmp_path / "model.safetensors")
    del state["roberta.encoder.layer.1.output.dense.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="encoder.layer.1.output.dense.weight"):
        bridge.SGLangRobertaForSequenceClassification.from_pretrained(tmp_path, device="cpu")


def test_ignore_mismatched_sizes_gives_a_new_head_as_transformers(tmp_path):
    """A classifier fine-tuned for 3 labels, loaded for 5 with ignore_mismatched_sizes=True (how
    run_glue.py moves an MNLI checkpoint to another task): the mismatched head tensors are
    re-initialised with transformers' draws, reported in mismatched_keys; without the keyword the
    load is refused naming the way out. Task classes expose num_labels."""
    build_task_checkpoint(tmp_path, "roberta", "ForSequenceClassification", num_labels=3)
    with pytest.raises(CheckpointError, match="ignore_mismatched_sizes=True"):
        bridge.SGLangRobertaForSequenceClassification.from_pretrained(tmp_path, num_labels=5, device="cpu")
    torch.manual_seed(9)
    ref, ref_info = transformers.RobertaForSequenceClassification.from_pretrained(
        tmp_path, num_labels=5, ignore_mismatched_sizes=True, output_loading_info=True)
    torch.manual_seed(9)
    model, info = bridge.SGLangRobertaForSequenceClassification.from_pretrained(
        tmp_path, num_labels=5, ignore_mismatched_sizes=True, output_loading_info=True, device="cpu")
    try:
        ref_mismatched = {k if isinstance(k, str) else k[0] for k in ref_info["mismatched_keys"]}
        assert info["mismatched_keys"] == ref_mismatched == {"classifier.out_proj.weight", "classifier.out_proj.bias"}
        assert info["unexpected_keys"] == set(ref_info["unexpected_keys"])
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in ref.state_dict().items() if k in state)
        assert model.num_labels == ref.num_labels == 5
    finally:
        model.close()
