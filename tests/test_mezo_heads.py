"""MeZOTrainer trains a sequence classifier from its labels (the model's own loss), equal to an
independent MeZO (Algorithm 1) on transformers' classifier with the same seeds: every weight,
the head only (with the frozen-layer cache underneath), and the top layer + head."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import max_abs_diff, sst2_train_rows
from test_heads import build_task_checkpoint
from test_mezo import EPS, LR, SEED, STEPS, WD, RecordingMeZOTrainer, z_of
from transformers import DataCollatorWithPadding

from sglang_hf_bridge import SGLangRobertaForSequenceClassification
from sglang_hf_bridge.engine import HEAD, base_layer_of
from sglang_hf_bridge.training import MeZOTrainingArguments


def reference_mezo_classifier(model, params, batches, weight_decay=WD):
    """Algorithm 1 of Malladi et al. on transformers' classifier, its own cross-entropy loss."""
    import zlib

    def loss(batch):
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return float(F.cross_entropy(logits, batch["labels"]))

    grads = []
    for step, batch in enumerate(batches):
        seed = zlib.crc32(f"{SEED}:{step}:0".encode())
        with torch.no_grad():
            for sign in (1.0, -2.0):
                for n, p in params.items():
                    p.add_(sign * EPS * z_of(seed, n, p.shape))
                if sign == 1.0:
                    l_plus = loss(batch)
            l_minus = loss(batch)
            for n, p in params.items():
                p.add_(EPS * z_of(seed, n, p.shape))
            g = (l_plus - l_minus) / (2 * EPS)
            for n, p in params.items():
                decay = 0.0 if (n.endswith("bias") or "LayerNorm" in n) else weight_decay
                p.sub_(LR * (g * z_of(seed, n, p.shape) + decay * p))
        grads.append(g)
    return grads


@pytest.fixture(scope="module")
def classifier_setup(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("mezo-cls")
    hf = build_task_checkpoint(path, "roberta", "ForSequenceClassification", seed=13, num_labels=2)
    rows = [dict(tokenizer(r["sentence"]), labels=r["label"]) for r in sst2_train_rows(24)]
    return path, hf, rows


@pytest.mark.parametrize("mode", ["all", "head", "top1"])
def test_classifier_mezo_matches_reference(classifier_setup, tokenizer, tmp_path, mode):
    path, hf, rows = classifier_setup
    extra = {"zo_trainable": "head"} if mode == "head" else {"zo_top_layers": 1} if mode == "top1" else {}
    args = MeZOTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=STEPS,
                                 learning_rate=LR, weight_decay=WD, lr_scheduler_type="constant", zo_eps=EPS,
                                 seed=SEED, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, **extra)
    with SGLangRobertaForSequenceClassification.from_pretrained(path, enable_lora=False) as model:
        trainer = RecordingMeZOTrainer(model=model, args=args, train_dataset=rows,
                                       data_collator=DataCollatorWithPadding(tokenizer))
        trainer.train()
        ref_model = copy.deepcopy(hf)
        trained = {"all": lambda n: True, "head": lambda n: base_layer_of(n) == HEAD,
                   "top1": lambda n: base_layer_of(n) >= 1}[mode]
        params = {n: p for n, p in ref_model.named_parameters() if trained(n)}
        assert any(n.startswith("classifier.") for n in params)
        ref = reference_mezo_classifier(ref_model, params, trainer.seen)
        ours = [h["projected_grads"][0] for h in trainer.zo_history]
        for a, b in zip(ours, ref):
            assert abs(a - b) <= 1e-3 * max(1.0, abs(b)), (a, b)
        state = model.state_dict()
        assert max(max_abs_diff(state[n], p) for n, p in ref_model.named_parameters()) <= 1e-6
        assert max(max_abs_diff(state[n], p) for n, p in hf.named_parameters() if n in params) > 1e-5
        untouched = [n for n, _ in hf.named_parameters() if n not in params]
        assert all(max_abs_diff(state[n], hf.state_dict()[n]) == 0 for n in untouched)
        if mode == "head":
            assert model.cache_stats()["frozen_layer"] is not None


def test_lora_with_its_own_head_matches_peft_under_mezo(classifier_setup, tokenizer, tmp_path):
    """LoRA + trainable head (a SEQ_CLS adapter's modules_to_save): the adapter's matrices and its
    head move exactly as MeZOTrainer moves them on the PEFT model (same names, same directions)."""
    from peft import LoraConfig, get_peft_model

    path, hf, rows = classifier_setup
    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                              target_modules=["query", "value"],
                                                              init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "adapter")

    def train(model, out):
        args = MeZOTrainingArguments(output_dir=str(out), per_device_train_batch_size=8, max_steps=STEPS,
                                     learning_rate=LR, weight_decay=WD, lr_scheduler_type="constant", zo_eps=EPS,
                                     seed=SEED, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
                                     zo_trainable="lora")
        trainer = RecordingMeZOTrainer(model=model, args=args, train_dataset=rows,
                                       data_collator=DataCollatorWithPadding(tokenizer))
        trainer.train()
        return trainer

    ref = train(peft_model, tmp_path / "ref")
    with SGLangRobertaForSequenceClassification.from_pretrained(path) as model:
        model.load_adapter(tmp_path / "adapter", adapter_name="task")
        ours = train(model, tmp_path / "ours")
        for a, b in zip(ours.zo_history, ref.zo_history):
            g, h = a["projected_grads"][0], b["projected_grads"][0]
            assert abs(g - h) <= 1e-3 * max(1.0, abs(h))
        from sglang_hf_bridge.training.mezo import _peft_saved_name

        expected = {_peft_saved_name(n): p for n, p in peft_model.named_parameters()
                    if "lora_" in n or "modules_to_save" in n}
        tensors = model.adapter_tensors("task")
        assert set(expected) == set(tensors)
        assert max(max_abs_diff(tensors[n], p) for n, p in expected.items()) <= 1e-6
        head = "base_model.model.classifier.out_proj.weight"
        assert max_abs_diff(tensors[head], hf.state_dict()["classifier.out_proj.weight"]) > 1e-5  # it trained
