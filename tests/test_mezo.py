"""MeZOTrainer against an independent, minimal MeZO written here from the paper (Algorithm 1)
on a plain transformers model: same seeds -> same projected gradients and weights."""

from __future__ import annotations

import copy
import zlib

import pytest
import torch
import torch.nn.functional as F
from conftest import max_abs_diff, mezo_setup
from peft import LoraConfig, get_peft_model

from sglang_hf_bridge import SGLangRobertaForMaskedLM
from sglang_hf_bridge.training import (
    MeZOTrainer,
    MeZOTrainingArguments,
    PromptClassifier,
    PromptCollator,
)

EPS, LR, WD, STEPS, SEED = 1e-3, 1e-3, 0.01, 3, 42


def z_of(seed: int, name: str, shape) -> torch.Tensor:
    """The documented direction: N(0, 1) from a generator seeded by (seed, HF/PEFT name)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1))
    return torch.randn(tuple(shape), generator=g)


def reference_mezo(model, params, batches, label_ids, mask_id, weight_decay=WD):
    """Algorithm 1 of Malladi et al. on a torch model: returns the projected gradients."""
    def loss(batch):
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return float(F.cross_entropy(logits[batch["input_ids"] == mask_id][:, label_ids], batch["labels"]))

    grads = []
    for step, batch in enumerate(batches):
        seed = zlib.crc32(f"{SEED}:{step}:0".encode())
        with torch.no_grad():
            for n, p in params.items():
                p.add_(EPS * z_of(seed, n, p.shape))
            l_plus = loss(batch)
            for n, p in params.items():
                p.add_(-2 * EPS * z_of(seed, n, p.shape))
            l_minus = loss(batch)
            for n, p in params.items():
                p.add_(EPS * z_of(seed, n, p.shape))
            g = (l_plus - l_minus) / (2 * EPS)
            for n, p in params.items():
                decay = 0.0 if (n.endswith("bias") or "LayerNorm" in n or "layer_norm" in n) else weight_decay
                p.sub_(LR * (g * z_of(seed, n, p.shape) + decay * p))
        grads.append(g)
    return grads


class RecordingMeZOTrainer(MeZOTrainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen = getattr(self, "seen", []) + [{k: v.clone() for k, v in inputs.items()}]
        return super().training_step(model, inputs, num_items_in_batch)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    return mezo_setup(tmp_path_factory, tokenizer, "mezo-ckpt", 24)


def _train(model, tokenizer, rows, template, label_ids, out, **extra):
    args = MeZOTrainingArguments(output_dir=str(out), per_device_train_batch_size=8, max_steps=STEPS,
                                 learning_rate=LR, weight_decay=WD, lr_scheduler_type="constant", zo_eps=EPS,
                                 seed=SEED, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
                                 remove_unused_columns=False, **extra)
    clf = PromptClassifier(model, label_ids, tokenizer.mask_token_id)
    trainer = RecordingMeZOTrainer(model=clf, args=args, train_dataset=rows,
                                   data_collator=PromptCollator(tokenizer, template))
    trainer.train()
    return trainer


def test_full_parameter_mezo_matches_reference(setup, tokenizer, tmp_path):
    path, hf, rows, template, label_ids = setup
    with SGLangRobertaForMaskedLM.from_pretrained(path, enable_lora=False) as model:
        trainer = _train(model, tokenizer, rows, template, label_ids, tmp_path)
        ours = {h["step"]: h["projected_grads"][0] for h in trainer.zo_history}
        ref_model = copy.deepcopy(hf)
        ref = reference_mezo(ref_model, dict(ref_model.named_parameters()), trainer.seen, label_ids,
                             tokenizer.mask_token_id)
        for step, g in enumerate(ref):
            # losses agree to ~1e-7 (different kernels); divided by 2*eps that is ~1e-4 on g
            assert abs(ours[step] - g) <= 1e-3 * max(1.0, abs(g)), (step, ours[step], g)
        from sglang_hf_bridge.engine.weights import hf_parameter_slices

        slices = hf_parameter_slices(model.runtime.model)
        worst = max(max_abs_diff(slices[n].view, p) for n, p in ref_model.named_parameters())
        assert worst <= 1e-6, worst
        moved = max(max_abs_diff(slices[n].view, p) for n, p in hf.named_parameters())
        assert moved > 1e-4  # training really changed the weights


@pytest.mark.parametrize("paired", [True, False])
def test_lora_mezo_matches_reference(setup, tokenizer, tmp_path, paired):
    path, hf, rows, template, label_ids = setup
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False)
    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(hf), config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    with SGLangRobertaForMaskedLM.from_pretrained(path) as model:
        model.load_adapter(tmp_path / "adapter", adapter_name="task")
        trainer = _train(model, tokenizer, rows, template, label_ids, tmp_path / "run", zo_paired_batch=paired)
        params = {n.replace(".default", ""): p for n, p in peft_model.named_parameters() if "lora_" in n}
        ref = reference_mezo(peft_model, params, trainer.seen, label_ids, tokenizer.mask_token_id)
        ours = [h["projected_grads"][0] for h in trainer.zo_history]
        for a, b in zip(ours, ref):
            assert abs(a - b) <= 1e-3 * max(1.0, abs(b)), (a, b)
        tensors = model.adapter_tensors("task")
        assert max(max_abs_diff(tensors[n], p) for n, p in params.items()) <= 1e-6
        assert model.active_adapters() == ["task"]


def test_perturb_and_restore_is_round_off_exact(setup, tokenizer):
    path, hf, *_ = setup
    from sglang_hf_bridge.engine.weights import hf_parameter_slices
    from sglang_hf_bridge.training.zo import EngineWeightsTarget

    with SGLangRobertaForMaskedLM.from_pretrained(path, enable_lora=False) as model:
        target = EngineWeightsTarget(model)
        before = {n: s.view.clone() for n, s in hf_parameter_slices(model.runtime.model).items()}
        for seed in (1, 2, 3):
            target.perturb(seed, EPS)
            target.perturb(seed, -2 * EPS)
            target.perturb(seed, EPS)
        after = hf_parameter_slices(model.runtime.model)
        assert max(max_abs_diff(after[n].view, t) for n, t in before.items()) <= 1e-6


def test_resume_from_checkpoint_gives_the_same_trajectory(setup, tokenizer, tmp_path):
    path, hf, rows, template, label_ids = setup
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False)
    torch.manual_seed(1)
    get_peft_model(copy.deepcopy(hf), config).save_pretrained(tmp_path / "adapter")

    from transformers import TrainerCallback

    class StopAt(TrainerCallback):  # an interruption after the step-2 checkpoint
        def __init__(self, step):
            self.step = step

        def on_step_end(self, args, state, control, **kw):
            if self.step is not None and state.global_step >= self.step:
                control.should_training_stop = True

    def run(out, max_steps, resume=None, stop=None):
        with SGLangRobertaForMaskedLM.from_pretrained(path) as model:
            model.load_adapter(tmp_path / "adapter", adapter_name="task")
            args = MeZOTrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=max_steps,
                                         learning_rate=LR, weight_decay=WD, zo_eps=EPS, seed=SEED, report_to=[],
                                         save_strategy="steps", save_steps=2, use_cpu=True,
                                         remove_unused_columns=False, lr_scheduler_type="linear")
            trainer = MeZOTrainer(model=PromptClassifier(model, label_ids, tokenizer.mask_token_id), args=args,
                                  train_dataset=rows, data_collator=PromptCollator(tokenizer, template),
                                  callbacks=[StopAt(stop)])
            trainer.train(resume_from_checkpoint=resume)
            return {k: v.clone() for k, v in model.adapter_tensors("task").items()}, trainer

    straight, _ = run(tmp_path / "a", 4)
    run(tmp_path / "b", 4, stop=2)
    assert (tmp_path / "b" / "checkpoint-2" / "adapter_model.safetensors").exists()
    resumed, trainer = run(tmp_path / "b", 4, resume=str(tmp_path / "b" / "checkpoint-2"))
    assert [h["step"] for h in trainer.zo_history] == [2, 3]
    assert max(max_abs_diff(straight[k], resumed[k]) for k in straight) <= 1e-6


def test_plain_trainer_backprop_fails_pointing_to_mezo(setup, tokenizer, tmp_path):
    from transformers import Trainer, TrainingArguments

    from sglang_hf_bridge import InferenceOnlyError

    path, hf, rows, template, label_ids = setup
    with SGLangRobertaForMaskedLM.from_pretrained(path) as model:
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[],
                                 use_cpu=True, remove_unused_columns=False, save_strategy="no")
        trainer = Trainer(model=PromptClassifier(model, label_ids, tokenizer.mask_token_id), args=args,
                          train_dataset=rows, data_collator=PromptCollator(tokenizer, template))
        with pytest.raises(InferenceOnlyError, match="MeZOTrainer"):
            trainer.train()


def test_evaluate_and_predict_with_accuracy(setup, tokenizer, tmp_path):
    from sglang_hf_bridge.training import accuracy_metrics

    path, hf, rows, template, label_ids = setup
    with SGLangRobertaForMaskedLM.from_pretrained(path) as model:
        args = MeZOTrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=8, report_to=[],
                                     use_cpu=True, remove_unused_columns=False)
        clf = PromptClassifier(model, label_ids, tokenizer.mask_token_id)
        trainer = MeZOTrainer(model=clf, args=args, eval_dataset=rows, compute_metrics=accuracy_metrics,
                              data_collator=PromptCollator(tokenizer, template))
        metrics = trainer.evaluate()
        hf_clf = PromptClassifier(hf, label_ids, tokenizer.mask_token_id)
        batch = PromptCollator(tokenizer, template)(rows)
        ref = hf_clf(**batch)
        expected = float((ref["logits"].argmax(-1) == batch["labels"]).float().mean())
        assert abs(metrics["eval_accuracy"] - expected) < 1e-9
        assert abs(metrics["eval_loss"] - float(ref["loss"])) <= 1e-5
        pred = trainer.predict(rows)
        assert max_abs_diff(torch.as_tensor(pred.predictions), ref["logits"]) <= 1e-5
