"""Tests that are HF scripts: the calls of transformers' examples/pytorch/text-classification/run_glue.py
(a local dataset, no task name), run_classification.py (its multi-label path) and
token-classification/run_ner.py, written once each and run with only the class names changed --
transformers' Auto classes + Trainer, then the engine's Auto classes (+ MeZOTrainer /
MeZOTrainingArguments to train). Each starts from a masked-LM checkpoint, so the task head is new
and initialised under the script's seed, as in a real fine-tuning run."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any, Dict, List

import numpy as np
import pytest
import torch
from conftest import SST2_K_SHOT, TOKENIZER_DIR, build_checkpoint
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorForTokenClassification,
    PretrainedConfig,
    Trainer,
    TrainingArguments,
    set_seed,
)

from sglang_hf_bridge import SGLangAutoModelForSequenceClassification, SGLangAutoModelForTokenClassification
from sglang_hf_bridge.training import MeZOTrainer, MeZOTrainingArguments, load_lmbff_tsv

datasets = pytest.importorskip("datasets")
SEED = 42
NER_LABELS = ["O", "B-ENT", "I-ENT", "B-NUM"]


@dataclass
class ScriptRun:
    model: Any
    trainer: Any
    eval_metrics: Dict[str, float]
    predictions: np.ndarray


def _finish(model, trainer, eval_dataset, predict_dataset) -> ScriptRun:
    """The scripts' common tail: train (+ save_model, metrics, state), evaluate, predict."""
    args = trainer.args
    if args.do_train:
        result = trainer.train()
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    metrics = trainer.evaluate(eval_dataset=eval_dataset)
    metrics["eval_samples"] = len(eval_dataset)
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    predictions = trainer.predict(predict_dataset, metric_key_prefix="predict").predictions
    return ScriptRun(model, trainer, metrics, predictions)


def _closing(model):
    if hasattr(model, "close"):
        model.close()


def run_glue(auto_model, trainer_class, training_args, model_path: str, raw: "datasets.DatasetDict") -> ScriptRun:
    """run_glue.py's main() for local files without --task_name (single sentences)."""
    set_seed(training_args.seed)
    label_list = sorted(raw["train"].unique("label"))
    num_labels = len(label_list)
    config = AutoConfig.from_pretrained(model_path, num_labels=num_labels, finetuning_task=None)
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR), use_fast=True)
    model = auto_model.from_pretrained(model_path, from_tf=False, config=config)
    try:
        sentence1_key, sentence2_key = [c for c in raw["train"].column_names if c != "label"][0], None
        label_to_id = None
        if model.config.label2id != PretrainedConfig(num_labels=num_labels).label2id:
            raise AssertionError("a fresh head has the default labels")
        label_to_id = {v: i for i, v in enumerate(label_list)}
        model.config.label2id = label_to_id
        model.config.id2label = {i: label for label, i in config.label2id.items()}

        def preprocess_function(examples):
            args = (examples[sentence1_key],) if sentence2_key is None else (examples[sentence1_key],
                                                                               examples[sentence2_key])
            result = tokenizer(*args, padding=False, max_length=128, truncation=True)
            result["label"] = [label_to_id[v] for v in examples["label"]]
            return result

        with training_args.main_process_first(desc="dataset map pre-processing"):
            data = raw.map(preprocess_function, batched=True)

        def compute_metrics(p):
            preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
            return {"accuracy": float((np.argmax(preds, axis=1) == p.label_ids).astype(np.float32).mean())}

        trainer = trainer_class(model=model, args=training_args,
                                train_dataset=data["train"] if training_args.do_train else None,
                                eval_dataset=data["validation"], compute_metrics=compute_metrics,
                                processing_class=tokenizer, data_collator=None)
        return _finish(model, trainer, data["validation"], data["test"].remove_columns("label"))
    except BaseException:
        _closing(model)
        raise


def run_classification(auto_model, trainer_class, training_args, model_path: str, raw) -> ScriptRun:
    """run_classification.py's main() on its multi-label path (labels are lists of names)."""
    set_seed(training_args.seed)
    label_list = sorted({name for labels in raw["train"]["label"] for name in labels})
    config = AutoConfig.from_pretrained(model_path, num_labels=len(label_list), finetuning_task="text-classification")
    config.problem_type = "multi_label_classification"
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR), use_fast=True)
    model = auto_model.from_pretrained(model_path, config=config, ignore_mismatched_sizes=False)
    try:
        label_to_id = {v: i for i, v in enumerate(label_list)}
        model.config.label2id = label_to_id
        model.config.id2label = {i: label for label, i in label_to_id.items()}

        def multi_labels_to_ids(labels: List[str]) -> List[float]:
            ids = [0.0] * len(label_to_id)  # BCELoss requires float as target type
            for label in labels:
                ids[label_to_id[label]] = 1.0
            return ids

        def preprocess_function(examples):
            result = tokenizer(examples["sentence"], padding=False, max_length=128, truncation=True)
            result["label"] = [multi_labels_to_ids(labels) for labels in examples["label"]]
            return result

        data = raw.map(preprocess_function, batched=True)

        def compute_metrics(p):
            preds = np.array([np.where(p > 0, 1, 0) for p in p.predictions])  # sigmoid(p) > 0.5
            return {"micro_exact": float((preds == p.label_ids).all(axis=1).mean())}

        trainer = trainer_class(model=model, args=training_args,
                                train_dataset=data["train"] if training_args.do_train else None,
                                eval_dataset=data["validation"], compute_metrics=compute_metrics,
                                processing_class=tokenizer, data_collator=None)
        return _finish(model, trainer, data["validation"], data["test"].remove_columns("label"))
    except BaseException:
        _closing(model)
        raise


def run_ner(auto_model, trainer_class, training_args, model_path: str, raw) -> ScriptRun:
    """run_ner.py's main() for local files (tokens / ner_tags columns, label_all_tokens False)."""
    set_seed(training_args.seed)
    label_list = NER_LABELS
    config = AutoConfig.from_pretrained(model_path, num_labels=len(label_list), finetuning_task="ner")
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR), use_fast=True, add_prefix_space=True)
    model = auto_model.from_pretrained(model_path, config=config, ignore_mismatched_sizes=False)
    try:
        model.config.label2id = {label: i for i, label in enumerate(label_list)}
        model.config.id2label = dict(enumerate(label_list))

        def tokenize_and_align_labels(examples):
            tokenized = tokenizer(examples["tokens"], padding=False, truncation=True, max_length=128,
                                  is_split_into_words=True)
            labels = []
            for i, label in enumerate(examples["ner_tags"]):
                word_ids, previous, label_ids = tokenized.word_ids(batch_index=i), None, []
                for word_idx in word_ids:
                    if word_idx is None or word_idx == previous:
                        label_ids.append(-100)
                    else:
                        label_ids.append(label[word_idx])
                    previous = word_idx
                labels.append(label_ids)
            tokenized["labels"] = labels
            return tokenized

        data = raw.map(tokenize_and_align_labels, batched=True, remove_columns=raw["train"].column_names)
        collator = DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=None)

        def compute_metrics(p):  # seqeval is not installed here: token accuracy on labelled tokens
            preds, labels = np.argmax(p.predictions, axis=2), p.label_ids
            keep = labels != -100
            return {"accuracy": float((preds[keep] == labels[keep]).mean())}

        trainer = trainer_class(model=model, args=training_args,
                                train_dataset=data["train"] if training_args.do_train else None,
                                eval_dataset=data["validation"], processing_class=tokenizer,
                                data_collator=collator, compute_metrics=compute_metrics)
        return _finish(model, trainer, data["validation"], data["test"])
    except BaseException:
        _closing(model)
        raise


# ---------------------------------------------------------------------- data, checkpoints
def _sst2(split: str, n: int):
    """``n`` rows spread over the split (its files list the classes one after the other)."""
    rows = load_lmbff_tsv(SST2_K_SHOT / f"{split}.tsv")
    return rows[:: max(1, len(rows) // n)][:n]


def glue_data():
    part = lambda split, n: datasets.Dataset.from_dict(  # noqa: E731
        {"sentence": [r["sentence"] for r in _sst2(split, n)],
         "label": ["positive" if r["label"] else "negative" for r in _sst2(split, n)]})
    return datasets.DatasetDict({"train": part("train", 16), "validation": part("dev", 16), "test": part("test", 8)})


def multi_label_data():
    def labels(r):
        return (["positive"] if r["label"] else ["negative"]) + (["long"] if len(r["sentence"].split()) > 12 else [])

    part = lambda split, n: datasets.Dataset.from_dict(  # noqa: E731
        {"sentence": [r["sentence"] for r in _sst2(split, n)], "label": [labels(r) for r in _sst2(split, n)]})
    return datasets.DatasetDict({"train": part("train", 16), "validation": part("dev", 16), "test": part("test", 8)})


def ner_data():
    """Words of SST-2 sentences tagged by rule: capitalised runs as entities, digits as numbers."""
    def tag(words):
        tags, inside = [], False
        for w in words:
            if w.isdigit():
                tags.append(3)
                inside = False
            elif w[:1].isupper():
                tags.append(2 if inside else 1)
                inside = True
            else:
                tags.append(0)
                inside = False
        return tags

    def part(split, n):
        words = [r["sentence"].split()[:20] for r in _sst2(split, n)]
        words = [[w.capitalize() if i % 4 == 1 else w for i, w in enumerate(ws)] for ws in words]
        return datasets.Dataset.from_dict({"tokens": words, "ner_tags": [tag(ws) for ws in words]})

    return datasets.DatasetDict({"train": part("train", 16), "validation": part("dev", 16), "test": part("test", 8)})


@pytest.fixture(scope="module")
def mlm_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("task-scripts-ckpt")
    build_checkpoint(path, "roberta", seed=9)
    return str(path)


SCRIPTS = {
    "run_glue": (run_glue, glue_data, AutoModelForSequenceClassification, SGLangAutoModelForSequenceClassification),
    "run_classification": (run_classification, multi_label_data, AutoModelForSequenceClassification,
                           SGLangAutoModelForSequenceClassification),
    "run_ner": (run_ner, ner_data, AutoModelForTokenClassification, SGLangAutoModelForTokenClassification),
}


def _args(out, train: bool, cls=TrainingArguments):
    extra = dict(max_steps=3, learning_rate=1e-4, zo_eps=1e-3, lr_scheduler_type="constant", save_strategy="no",
                 logging_steps=1) if train else {}
    return cls(output_dir=str(out), per_device_train_batch_size=8, per_device_eval_batch_size=8, seed=SEED,
               report_to=[], use_cpu=True, do_train=train, do_eval=True, **extra)


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_evaluate_and_predict_match_transformers(script, mlm_checkpoint, tmp_path):
    run, data, hf_auto, our_auto = SCRIPTS[script]
    hf = run(hf_auto, Trainer, _args(tmp_path / "hf", False), mlm_checkpoint, data())
    ours = run(our_auto, Trainer, _args(tmp_path / "ours", False), mlm_checkpoint, data())
    try:
        assert type(ours.model).__name__.startswith("SGLangRoberta")
        a, b = hf.eval_metrics, ours.eval_metrics
        assert abs(a["eval_loss"] - b["eval_loss"]) <= 1e-5 * max(1.0, abs(a["eval_loss"]))
        metric = "eval_micro_exact" if script == "run_classification" else "eval_accuracy"
        assert a[metric] == b[metric]
        assert hf.predictions.shape == ours.predictions.shape
        assert float(np.abs(hf.predictions - ours.predictions).max()) <= 1e-5
    finally:
        ours.model.close()


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_mezo_training_matches_transformers_under_mezo(script, mlm_checkpoint, tmp_path):
    """The same script trains both models with MeZOTrainer: same projected gradients, same weights
    (the engine's state_dict vs transformers'), same evaluation afterwards; save_model writes a
    checkpoint transformers' class loads with the trained head."""
    run, data, hf_auto, our_auto = SCRIPTS[script]
    hf = run(hf_auto, MeZOTrainer, _args(tmp_path / "hf", True, MeZOTrainingArguments), mlm_checkpoint, data())
    ours = run(our_auto, MeZOTrainer, _args(tmp_path / "ours", True, MeZOTrainingArguments), mlm_checkpoint, data())
    try:
        for x, y in zip(hf.trainer.zo_history, ours.trainer.zo_history):
            g, h = x["projected_grads"][0], y["projected_grads"][0]
            assert abs(g - h) <= 1e-3 * max(1.0, abs(g)), (g, h)
        ref = hf.model.state_dict()
        state = ours.model.state_dict()
        assert max(float((state[k] - ref[k]).abs().max()) for k in state) <= 1e-6
        a, b = hf.eval_metrics["eval_loss"], ours.eval_metrics["eval_loss"]
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a))
        saved = hf_auto.from_pretrained(tmp_path / "ours")
        head = "classifier.out_proj.weight" if script != "run_ner" else "classifier.weight"
        assert torch.equal(saved.state_dict()[head], state[head])
        assert saved.config.id2label == ours.model.config.id2label
    finally:
        ours.model.close()
        shutil.rmtree(tmp_path, ignore_errors=True)
