"""Every task class at tp_size=2: the heads are replicated on both ranks, the encoder split; answers,
state dicts and a new head initialised at load equal transformers' (fp32 <= 1e-5)."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import max_abs_diff
from test_heads import build_task_checkpoint, padded_batch

import sglang_hf_bridge as bridge

TOL = 1e-5


# First in the file: SGLang holds one parallel runtime per process, so this engine must be closed
# before the module fixture's start (and the fixture's last one is closed only at the module's end).
def test_tp2_new_head_from_a_masked_lm_checkpoint(tmp_path):
    """Every rank loads the head the face initialised (a private file, removed after the start)."""
    build_task_checkpoint(tmp_path, "roberta", "ForMaskedLM", seed=6)
    torch.manual_seed(77)
    ref = transformers.RobertaForSequenceClassification.from_pretrained(tmp_path, num_labels=2).eval()
    torch.manual_seed(77)
    model = bridge.SGLangRobertaForSequenceClassification.from_pretrained(tmp_path, num_labels=2, tp_size=2,
                                                                          device="cpu")
    try:
        enc = padded_batch("roberta")
        with torch.no_grad():
            expected = ref(**enc).logits
        assert max_abs_diff(model(**enc).logits, expected) <= TOL
        assert not list(tmp_path.glob("*new_tensors*"))
    finally:
        model.close()


def test_tp2_adapters_with_their_own_heads(tmp_path):
    """Per-row PEFT SEQ_CLS adapters (LoRA + own classifier) at tp_size=2: every rank holds each
    adapter's head; rows equal PEFT's."""
    from test_heads_lora import peft_adapter

    hf = build_task_checkpoint(tmp_path / "base", "roberta", "ForSequenceClassification", seed=8, num_labels=3)
    peft_a = peft_adapter(hf, "SEQ_CLS", 21, tmp_path / "a")
    model = bridge.SGLangRobertaForSequenceClassification.from_pretrained(tmp_path / "base", tp_size=2, device="cpu")
    try:
        model.load_adapter(tmp_path / "a", adapter_name="a")
        enc = padded_batch("roberta")
        out = model(**enc, adapter_names=["a", "__base__", "a"]).logits
        with torch.no_grad():
            ref_a, ref_base = peft_a(**enc).logits, hf(**enc).logits
        assert max_abs_diff(out[[0, 2]], ref_a[[0, 2]]) <= TOL
        assert max_abs_diff(out[1], ref_base[1]) <= TOL
        model.save_adapter(tmp_path / "saved", adapter_name="a")
        from peft import PeftModel

        back = PeftModel.from_pretrained(hf, tmp_path / "saved").eval()
        with torch.no_grad():
            assert max_abs_diff(back(**enc).logits, ref_a) <= TOL
    finally:
        model.close()


@pytest.fixture(scope="module", params=[(f, s, o) for f in ("roberta", "bert") for s, o in (
    ("ForSequenceClassification", {"num_labels": 3}), ("ForTokenClassification", {"num_labels": 4}),
    ("ForQuestionAnswering", {}), ("Model", {}))],
                ids=lambda p: f"{p[0]}-{p[1]}")
def tp_task_pair(request, tmp_path_factory):
    family, suffix, overrides = request.param
    path = tmp_path_factory.mktemp(f"tp-{family}{suffix}")
    hf = build_task_checkpoint(path, family, suffix, seed=5, **overrides)
    prefix = "Bert" if family == "bert" else "Roberta"
    model = getattr(bridge, f"SGLang{prefix}{suffix}").from_pretrained(path, device="cpu", tp_size=2)
    yield hf, model, family, suffix
    model.close()


def test_tp2_matches_transformers(tp_task_pair):
    hf, model, family, suffix = tp_task_pair
    for left in (False, True):
        enc = padded_batch(family, left)
        with torch.no_grad():
            ref = hf(**enc, output_hidden_states=True)
        out = model(**enc, output_hidden_states=True)
        name = {"Model": "last_hidden_state", "ForQuestionAnswering": "start_logits"}.get(suffix, "logits")
        assert max_abs_diff(getattr(out, name), getattr(ref, name)) <= TOL
        if suffix == "Model":
            assert max_abs_diff(out.pooler_output, ref.pooler_output) <= TOL
        if suffix == "ForQuestionAnswering":
            assert max_abs_diff(out.end_logits, ref.end_logits) <= TOL
        assert all(max_abs_diff(a, b) <= TOL for a, b in zip(out.hidden_states, ref.hidden_states))
    state = model.state_dict()
    assert all(max_abs_diff(state[k], v) == 0 for k, v in hf.state_dict().items() if k in state)
    assert model.engine_pool_stats() == model.engine_pool_capacity()
