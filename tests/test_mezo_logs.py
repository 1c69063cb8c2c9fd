"""MeZOTrainer's logs tell the truth: the number of parameters MeZO trains, the step's projected
gradient (not a zero gradient norm), and no FLOP count it never computed."""

from __future__ import annotations

import contextlib
import copy
import logging

import pytest
import torch
import transformers
from conftest import mezo_setup
from peft import LoraConfig, get_peft_model

from sglang_hf_bridge import SGLangRobertaForMaskedLM
from sglang_hf_bridge.training import (
    MeZOTrainer,
    MeZOTrainingArguments,
    PromptClassifier,
    PromptCollator,
)

STEPS = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    return mezo_setup(tmp_path_factory, tokenizer, "mezo-logs-ckpt", 16)


@contextlib.contextmanager
def trainer_log_lines():
    """The lines transformers' Trainer logs at INFO (its library logger does not propagate)."""
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler, level = Keep(), transformers.logging.get_verbosity()
    trainer_logger = logging.getLogger("transformers.trainer")
    trainer_logger.addHandler(handler)
    transformers.logging.set_verbosity_info()
    try:
        yield lines
    finally:
        transformers.logging.set_verbosity(level)
        trainer_logger.removeHandler(handler)


def run_and_check(model, tokenizer, rows, template, label_ids, out, expected_count, **extra):
    args = MeZOTrainingArguments(output_dir=str(out), per_device_train_batch_size=8, max_steps=STEPS,
                                 learning_rate=1e-3, zo_eps=1e-3, seed=42, report_to=[], save_strategy="no",
                                 logging_steps=1, use_cpu=True, remove_unused_columns=False, **extra)
    trainer = MeZOTrainer(model=PromptClassifier(model, label_ids, tokenizer.mask_token_id), args=args,
                          train_dataset=rows, data_collator=PromptCollator(tokenizer, template))
    with trainer_log_lines() as lines:
        result = trainer.train()

    counts = [line for line in lines if "Number of trainable parameters" in line]
    assert len(counts) == 1, lines
    assert counts[0].strip().startswith(f"Number of trainable parameters = {expected_count:,} "), counts
    assert trainer.zo_num_parameters() == expected_count

    history = trainer.state.log_history
    step_logs = [h for h in history if "loss" in h]
    assert [h["step"] for h in step_logs] == list(range(1, STEPS + 1))
    assert [h["step"] + 1 for h in trainer.zo_history] == [h["step"] for h in step_logs]
    for logged, zo in zip(step_logs, trainer.zo_history):
        mean = sum(zo["projected_grads"]) / len(zo["projected_grads"])
        assert logged["zo_projected_grad"] == pytest.approx(mean, rel=1e-12, abs=0.0)
        assert logged["zo_projected_grad"] != 0.0
    assert not any("grad_norm" in h for h in history), history
    assert not any("total_flos" in h for h in history), history
    assert "total_flos" not in result.metrics and "train_loss" in result.metrics
    return trainer


def test_full_parameter_logs_count_and_projected_gradient(setup, tokenizer, tmp_path):
    path, hf, rows, template, label_ids = setup
    # What transformers' Trainer logs for the same model trained with backprop: every parameter.
    expected = sum(p.numel() for p in hf.parameters() if p.requires_grad)
    with SGLangRobertaForMaskedLM.from_pretrained(path, enable_lora=False) as model:
        run_and_check(model, tokenizer, rows, template, label_ids, tmp_path, expected)


def test_lora_logs_adapter_count_and_mean_projected_gradient(setup, tokenizer, tmp_path):
    path, hf, rows, template, label_ids = setup
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False)
    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(hf), config)
    peft_model.save_pretrained(tmp_path / "adapter")
    expected, total = peft_model.get_nb_trainable_parameters()
    assert 0 < expected < total
    with SGLangRobertaForMaskedLM.from_pretrained(path) as model:
        model.load_adapter(tmp_path / "adapter", adapter_name="task")
        trainer = run_and_check(model, tokenizer, rows, template, label_ids, tmp_path / "run", expected,
                                zo_num_samples=2)
        # the scratch adapters of the paired batch are not counted; the logged value is the mean of n=2
        assert all(len(h["projected_grads"]) == 2 for h in trainer.zo_history)


def test_torch_model_top_layers_logs_the_trained_count(setup, tokenizer, tmp_path):
    """On plain transformers, Trainer would count every parameter; MeZO trains only the top layer + head."""
    path, hf, rows, template, label_ids = setup
    model = copy.deepcopy(hf)
    expected = sum(p.numel() for n, p in model.named_parameters()
                   if ".encoder.layer.1." in n or n.startswith("lm_head."))
    assert 0 < expected < sum(p.numel() for p in model.parameters())
    run_and_check(model, tokenizer, rows, template, label_ids, tmp_path, expected, zo_top_layers=1)
