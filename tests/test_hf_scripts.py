"""A test that is an HF script: the calls of transformers' examples/pytorch/language-modeling/run_mlm.py
(--line_by_line), written once as ``run_mlm`` and run with only the model class and the Trainer /
TrainingArguments names changed: transformers' AutoModelForMaskedLM + Trainer, then
SGLangRobertaForMaskedLM (+ MeZOTrainer / MeZOTrainingArguments to train)."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import pytest
import torch
from conftest import SST2_K_SHOT, TOKENIZER_DIR, build_checkpoint
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
    set_seed,
)

from sglang_hf_bridge import SGLangRobertaForMaskedLM
from sglang_hf_bridge.training import MeZOTrainer, MeZOTrainingArguments, load_lmbff_tsv

datasets = pytest.importorskip("datasets")

SEED = 42
SST2 = SST2_K_SHOT


class RecordingCollator:
    """Test instrumentation around the script's collator: keeps every masked batch it makes."""

    def __init__(self, collator):
        self.collator, self.batches = collator, []

    def __call__(self, features):
        batch = self.collator(features)
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return batch


@dataclass
class ScriptRun:
    model: Any
    trainer: Any
    collator: RecordingCollator
    eval_metrics: Dict[str, float]
    predictions: Any
    train_metrics: Optional[Dict[str, float]] = None
    logs: List[dict] = field(default_factory=list)


def run_mlm(model_class, trainer_class, training_args, model_name_or_path: str, tokenizer_name: str,
            train_texts: List[str], eval_texts: List[str], resume_from_checkpoint: Optional[str] = None,
            max_seq_length: int = 128, mlm_probability: float = 0.15) -> ScriptRun:
    """run_mlm.py's main() after argument parsing (model_args / data_args at their defaults, except
    --line_by_line, --max_seq_length 128 and --tokenizer_name). The caller closes ``model``."""
    set_seed(training_args.seed)
    raw_datasets = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": train_texts}),
                                         "validation": datasets.Dataset.from_dict({"text": eval_texts})})
    config_kwargs = {"cache_dir": None, "revision": "main", "token": None, "trust_remote_code": False}
    config = AutoConfig.from_pretrained(model_name_or_path, **config_kwargs)
    tokenizer_kwargs = {"cache_dir": None, "use_fast": True, "revision": "main", "token": None,
                        "trust_remote_code": False}
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name, **tokenizer_kwargs)
    torch_dtype = None  # --torch_dtype default
    model = model_class.from_pretrained(
        model_name_or_path,
        from_tf=bool(".ckpt" in model_name_or_path),
        config=config,
        cache_dir=None,
        revision="main",
        token=None,
        trust_remote_code=False,
        torch_dtype=torch_dtype,
        low_cpu_mem_usage=False,
    )
    try:
        # We resize the embeddings only when necessary to avoid index errors.
        embedding_size = model.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > embedding_size:
            model.resize_token_embeddings(len(tokenizer))

        column_names = list(raw_datasets["train"].features)
        text_column_name = "text" if "text" in column_names else column_names[0]
        max_seq_length = min(max_seq_length, tokenizer.model_max_length)
        padding = False  # --pad_to_max_length False

        def tokenize_function(examples):
            examples[text_column_name] = [
                line for line in examples[text_column_name] if len(line) > 0 and not line.isspace()
            ]
            return tokenizer(examples[text_column_name], padding=padding, truncation=True,
                             max_length=max_seq_length, return_special_tokens_mask=True)

        with training_args.main_process_first(desc="dataset map tokenization"):
            tokenized_datasets = raw_datasets.map(tokenize_function, batched=True, remove_columns=[text_column_name],
                                                  desc="Running tokenizer on dataset line_by_line")
        train_dataset = tokenized_datasets["train"]
        eval_dataset = tokenized_datasets["validation"]

        def preprocess_logits_for_metrics(logits, labels):
            if isinstance(logits, tuple):
                logits = logits[0]
            return logits.argmax(dim=-1)

        def compute_metrics(eval_preds):  # evaluate.load("accuracy"), which is not installed here
            preds, labels = eval_preds
            labels = labels.reshape(-1)
            preds = preds.reshape(-1)
            mask = labels != -100
            return {"accuracy": float((preds[mask] == labels[mask]).mean())}

        pad_to_multiple_of_8 = training_args.fp16  # line_by_line and fp16 and not pad_to_max_length
        data_collator = RecordingCollator(DataCollatorForLanguageModeling(
            tokenizer=tokenizer, mlm_probability=mlm_probability,
            pad_to_multiple_of=8 if pad_to_multiple_of_8 else None))

        trainer = trainer_class(
            model=model,
            args=training_args,
            train_dataset=train_dataset if training_args.do_train else None,
            eval_dataset=eval_dataset if training_args.do_eval else None,
            processing_class=tokenizer,
            data_collator=data_collator,
            compute_metrics=compute_metrics,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        train_metrics = None
        if training_args.do_train:
            train_result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
            trainer.save_model()  # Saves the tokenizer too for easy upload
            train_metrics = train_result.metrics
            train_metrics["train_samples"] = len(train_dataset)
            trainer.log_metrics("train", train_metrics)
            trainer.save_metrics("train", train_metrics)
            trainer.save_state()

        set_seed(training_args.seed)  # (not in run_mlm: the same masks for both models' evaluation)
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_dataset)
        try:
            perplexity = math.exp(metrics["eval_loss"])
        except OverflowError:
            perplexity = float("inf")
        metrics["perplexity"] = perplexity
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

        # Beyond run_mlm: predictions (the full logits) on a few sentences.
        set_seed(training_args.seed)
        trainer.preprocess_logits_for_metrics = trainer.compute_metrics = None
        predictions = trainer.predict(eval_dataset.select(range(8)))
        trainer.create_model_card(finetuned_from=model_name_or_path, tasks="fill-mask")
        return ScriptRun(model, trainer, data_collator, metrics, predictions, train_metrics,
                         list(trainer.state.log_history))
    except BaseException:
        if hasattr(model, "close"):
            model.close()
        raise


def weights(model) -> Dict[str, torch.Tensor]:
    """HF-named weights: state_dict(), or the engine's HF-named views when it has no engine weights."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if "roberta.encoder.layer.0.attention.self.query.weight" in state:
        return state
    from sglang_hf_bridge.engine import hf_parameter_slices

    return {n: s.view.detach().clone() for n, s in hf_parameter_slices(model.runtime.model).items()}


def same_batches(a: RecordingCollator, b: RecordingCollator) -> None:
    assert len(a.batches) == len(b.batches) > 0
    for x, y in zip(a.batches, b.batches):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k
    assert any((x["labels"] != -100).any() for x in a.batches)  # something was masked


@pytest.fixture(scope="module")
def script_setup(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("run-mlm-ckpt")
    build_checkpoint(path, "roberta", seed=7)  # vocab_size=50265 covers the RoBERTa tokenizer
    tokenizer.save_pretrained(path)
    train = [r["sentence"] for r in load_lmbff_tsv(SST2 / "train.tsv")][:16]
    evals = [r["sentence"] for r in load_lmbff_tsv(SST2 / "dev.tsv")][:24]
    return str(path), train, evals


def eval_args(out):
    return dict(output_dir=str(out), per_device_eval_batch_size=8, seed=SEED, report_to=[], use_cpu=True,
                do_train=False, do_eval=True)


def test_run_mlm_evaluate_and_predict_match_transformers(script_setup, tmp_path):
    path, train, evals = script_setup
    hf = run_mlm(AutoModelForMaskedLM, Trainer, TrainingArguments(**eval_args(tmp_path / "hf")), path,
                 str(TOKENIZER_DIR), train, evals)
    ours = run_mlm(SGLangRobertaForMaskedLM, Trainer, TrainingArguments(**eval_args(tmp_path / "ours")), path,
                   str(TOKENIZER_DIR), train, evals)
    try:
        same_batches(hf.collator, ours.collator)
        a, b = hf.eval_metrics["eval_loss"], ours.eval_metrics["eval_loss"]
        assert abs(a - b) <= 1e-5 * abs(a), (a, b)
        assert abs(hf.eval_metrics["eval_accuracy"] - ours.eval_metrics["eval_accuracy"]) <= 1e-9
        p, q = hf.predictions, ours.predictions
        assert np.array_equal(p.label_ids, q.label_ids)
        assert p.predictions.shape == q.predictions.shape and p.predictions.shape[-1] == 50265
        assert float(np.abs(p.predictions - q.predictions).max()) <= 1e-5
        assert abs(p.metrics["test_loss"] - q.metrics["test_loss"]) <= 1e-5 * abs(p.metrics["test_loss"])
    finally:
        ours.model.close()


def train_args(out, max_steps=3, **extra):
    # 16 sentences in batches of 8: checkpoint-2 closes epoch 1. (Resuming mid-epoch, transformers 5.19's Trainer
    # collates the first batch before it restores the RNG state, so that batch's random masks differ from the
    # uninterrupted run's, whatever the model.)
    return dict(output_dir=str(out), per_device_train_batch_size=8, per_device_eval_batch_size=8,
                max_steps=max_steps, save_strategy="steps", save_steps=2, learning_rate=1e-4, zo_eps=1e-3,
                lr_scheduler_type="linear", logging_steps=1, seed=SEED, report_to=[], use_cpu=True, do_train=True,
                do_eval=True, **extra)


def test_run_mlm_mezo_train_resume_evaluate(script_setup, tmp_path):
    path, train, evals = script_setup
    # transformers' model with MeZOTrainer: the same script, the same directions (documented trajectory)
    hf = run_mlm(AutoModelForMaskedLM, MeZOTrainer, MeZOTrainingArguments(**train_args(tmp_path / "hf")), path,
                 str(TOKENIZER_DIR), train, evals)
    straight = run_mlm(SGLangRobertaForMaskedLM, MeZOTrainer,
                       MeZOTrainingArguments(**train_args(tmp_path / "straight")), path, str(TOKENIZER_DIR),
                       train, evals)
    try:
        final = weights(straight.model)
        assert straight.trainer.state.global_step == 3
        assert [h["step"] for h in straight.trainer.zo_history] == [0, 1, 2]
        same_batches(hf.collator, straight.collator)
        for h_hf, h_ours in zip(hf.trainer.zo_history, straight.trainer.zo_history):
            g, ours_g = h_hf["projected_grads"][0], h_ours["projected_grads"][0]
            assert abs(g - ours_g) <= 1e-3 * max(1.0, abs(g)), (g, ours_g)
        hf_final = {k: v.detach() for k, v in hf.model.state_dict().items()}
        assert set(hf_final) <= set(final)
        assert max((final[n] - hf_final[n]).abs().max().item() for n in hf_final) <= 1e-6
        a, b = hf.eval_metrics["eval_loss"], straight.eval_metrics["eval_loss"]
        assert abs(a - b) <= 1e-5 * abs(a), (a, b)
        assert (tmp_path / "straight" / "checkpoint-2" / "config.json").exists()
    finally:
        straight.model.close()

    # A run interrupted after the step-2 checkpoint, resumed by the script from it (a fresh model).
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", checkpoint)
    resumed = run_mlm(SGLangRobertaForMaskedLM, MeZOTrainer, MeZOTrainingArguments(**train_args(tmp_path / "resumed")),
                      path, str(TOKENIZER_DIR), train, evals, resume_from_checkpoint=str(checkpoint))
    try:
        assert [h["step"] for h in resumed.trainer.zo_history] == [2]
        again = weights(resumed.model)
        assert final.keys() == again.keys()
        assert max((final[n] - again[n]).abs().max().item() for n in final) <= 1e-6
        moved = weights_of_checkpoint(path)
        assert max((final[n] - moved[n]).abs().max().item() for n in moved if n in final) > 1e-5  # it trained
        a, b = straight.eval_metrics["eval_loss"], resumed.eval_metrics["eval_loss"]
        assert abs(a - b) <= 1e-5 * abs(a), (a, b)
        assert (tmp_path / "resumed" / "config.json").exists()  # trainer.save_model()
    finally:
        resumed.model.close()


def weights_of_checkpoint(path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(f"{path}/model.safetensors")
