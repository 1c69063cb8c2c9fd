"""Zeroth-order methods at tp_size=2 (a module of its own: one SGLang parallel runtime per process).
Each rank holds a share of every weight, draws the direction whole and keeps its share of the
state: LOZO-M's U-space momentum is kept whole on both ranks (the checkpoint holds it once), its 1-D
momentum split like the weights; Sparse MeZO's thresholds come from the whole tensors. Both equal
their references, as at tp 1."""

from __future__ import annotations

import copy

import pytest
from conftest import max_abs_diff
from safetensors.torch import load_file
from test_mezo import RecordingMeZOTrainer
from test_zo_lowrank_conservative import RANK, _args, _check_grads, classifier, lozo_reference  # noqa: F401
from test_zo_methods import SPARSITY, reference
from transformers import default_data_collator

from sglang_hf_bridge import SGLangRobertaForSequenceClassification
from sglang_hf_bridge.training.mezo import METHOD_KEY_SEP


@pytest.mark.parametrize("method", ["lozo-m", "sparse"])
def test_methods_at_tp_2_equal_their_reference(classifier, tmp_path, method):  # noqa: F811
    path, hf, rows = classifier
    with SGLangRobertaForSequenceClassification.from_pretrained(path, enable_lora=False, tp_size=2) as model:
        args = _args(tmp_path, method, zo_sparsity=SPARSITY, save_strategy="steps", save_steps=5)
        trainer = RecordingMeZOTrainer(model=model, args=args, train_dataset=rows, data_collator=default_data_collator)
        trainer.train()
        ref_model = copy.deepcopy(hf)
        params = dict(ref_model.named_parameters())
        if method == "lozo-m":
            _check_grads(trainer, lozo_reference(ref_model, params, trainer.seen, momentum=True))
        else:  # (the same learning rate, weight decay, eps and seed as here)
            _check_grads(trainer, reference(ref_model, params, trainer.seen, "sparse"))
        state = model.state_dict()
        assert max(max_abs_diff(state[n], p) for n, p in params.items()) <= 1e-6
    saved_state = load_file(str(tmp_path / "checkpoint-5" / "zo_method_state.safetensors"))
    if method == "lozo-m":  # the U-space momentum whole (both ranks' copies equal), 1-D momentum assembled
        name = "roberta.encoder.layer.0.attention.self.query.weight"
        assert tuple(saved_state[f"{name}{METHOD_KEY_SEP}momentum_u"].shape) == (hf.config.hidden_size, RANK)
        bias = "roberta.encoder.layer.0.attention.self.query.bias"
        assert tuple(saved_state[f"{bias}{METHOD_KEY_SEP}momentum"].shape) == (hf.config.hidden_size,)
