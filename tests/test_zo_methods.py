"""``MeZOTrainingArguments(zo_optimizer=...)``: each zeroth-order method equals its published rule,
written here independently on transformers + plain torch with the same seeds and directions --
ZO-Bench's construction (``p.grad = g * z``, then torch's own SGD / SGD-momentum / AdamW step), and
Sparse MeZO's Algorithm 1 (magnitude thresholds fixed at the start, the mask derived from the weights
every step) -- full-parameter on the engine and LoRA against PEFT; the method's state survives a
resume; a user's method is a class."""

from __future__ import annotations

import copy
import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from conftest import max_abs_diff
from test_heads import build_task_checkpoint
from test_mezo import EPS, SEED, WD, RecordingMeZOTrainer, z_of
from transformers import default_data_collator

from sglang_hf_bridge import SGLangRobertaForSequenceClassification
from sglang_hf_bridge.training import MeZOTrainingArguments
from sglang_hf_bridge.training.zo_methods import ZOMethod

LR, STEPS, SPARSITY, HIZOO_ALPHA = 1e-3, 4, 0.8, 0.1  # an alpha large enough that H matters in 4 steps


def no_decay(name: str) -> bool:
    return name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name


def sparse_threshold(t: torch.Tensor) -> float:
    flat = t.detach().abs().flatten()
    return float(flat.kthvalue(max(1, math.ceil((1 - SPARSITY) * flat.numel()))).values)


def reference(model, params, batches, method: str, samples: int = 1, steps=None):
    """The published rule, step by step: ZO-Bench's (perturb, two losses, restore, p.grad = g z,
    torch optimizer step) or Sparse MeZO's Algorithm 1; with ``samples`` directions per step the
    estimate is their mean (n-SPSA)."""
    groups = [{"params": [p for n, p in params.items() if not no_decay(n)], "weight_decay": WD},
              {"params": [p for n, p in params.items() if no_decay(n)], "weight_decay": 0.0}]
    optimizer = {"sign": lambda: torch.optim.SGD(groups, lr=LR),
                 "momentum": lambda: torch.optim.SGD(groups, lr=LR, momentum=0.9),
                 "adam": lambda: torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.999), eps=1e-8),
                 "sparse": lambda: None, "hizoo": lambda: None}[method]()
    thresholds = {n: sparse_threshold(p) for n, p in params.items()}
    hessian = {n: torch.ones_like(p) for n, p in params.items()}

    def loss(batch):
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return float(F.cross_entropy(logits.float(), batch["labels"]))

    grads = []
    for step, batch in enumerate(batches[:steps]):
        with torch.no_grad():
            masks = {n: p.abs() <= thresholds[n] for n, p in params.items()}
            estimate = {n: torch.zeros_like(p) for n, p in params.items()}
            l_theta = loss(batch) if method == "hizoo" else None  # HiZOO's third forward pass
            for sample in range(samples):
                seed = zlib.crc32(f"{SEED}:{step}:{sample}".encode())
                z = {n: z_of(seed, n, p.shape) for n, p in params.items()}
                directions = {n: z[n] * masks[n] if method == "sparse" else
                              z[n] / hessian[n].sqrt() if method == "hizoo" else z[n] for n in params}
                for n, p in params.items():
                    p.add_(EPS * directions[n])
                l_plus = loss(batch)
                for n, p in params.items():
                    p.sub_(2 * EPS * directions[n])
                l_minus = loss(batch)
                for n, p in params.items():
                    p.add_(EPS * directions[n])
                g = (l_plus - l_minus) / (2 * EPS)
                grads.append(g)
                if method == "hizoo":  # the authors' zo_Hessian_step_update: H first, then the step with it
                    curvature = abs(l_plus + l_minus - 2 * l_theta) / (2 * EPS ** 2)
                    for n in params:
                        hessian[n] = (1 - HIZOO_ALPHA) * hessian[n] + HIZOO_ALPHA * curvature * hessian[n] * z[n] ** 2
                        directions[n] = z[n] / hessian[n].sqrt()
                for n in params:
                    estimate[n] += (math.copysign(1.0, g) if method == "sign" else g) * directions[n] / samples
            if method in ("sparse", "hizoo"):  # theta -= lr (estimate + wd theta), sparse: decay on m only
                for n, p in params.items():
                    decay = 0.0 if no_decay(n) else WD
                    p.sub_(LR * (estimate[n] + decay * p * (masks[n] if method == "sparse" else 1)))
                continue
            for n, p in params.items():
                p.grad = estimate[n]
            optimizer.step()
            for p in params.values():
                p.grad = None
    return grads


def build_classifier(path, seed: int, data_seed: int, n_rows: int):
    """A 2-layer RoBERTa classifier saved at ``path`` and ``n_rows`` random padded rows."""
    hf = build_task_checkpoint(path, "roberta", "ForSequenceClassification", seed=seed, num_labels=2,
                               vocab_size=300, num_hidden_layers=2)
    g = torch.Generator().manual_seed(data_seed)
    rows = []
    for i in range(n_rows):
        n = int(torch.randint(4, 24, (1,), generator=g))
        ids = torch.randint(3, 300, (24,), generator=g)
        ids[0] = 0
        rows.append({"input_ids": ids, "attention_mask": (torch.arange(24) < n).long(), "labels": i % 2})
    return path, hf, rows


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return build_classifier(tmp_path_factory.mktemp("zo-methods"), 61, 67, 32)


def _args(out, method, **extra):
    kwargs = dict(output_dir=str(out), per_device_train_batch_size=8, max_steps=STEPS, learning_rate=LR,
                  weight_decay=WD, lr_scheduler_type="constant", zo_eps=EPS, seed=SEED, report_to=[],
                  save_strategy="no", logging_steps=1, use_cpu=True, zo_optimizer=method, zo_sparsity=SPARSITY,
                  zo_hizoo_alpha=HIZOO_ALPHA)
    return MeZOTrainingArguments(**{**kwargs, **extra})


def train_full_parameter(classifier, args):
    """MeZO on every engine weight: (trainer, a copy of the HF model for the reference, the engine's
    state dict after training, the method's state after training)."""
    path, hf, rows = classifier
    with SGLangRobertaForSequenceClassification.from_pretrained(path, enable_lora=False) as model:
        trainer = RecordingMeZOTrainer(model=model, args=args, train_dataset=rows, data_collator=default_data_collator)
        trainer.train()
        method_state = trainer.zo_target().method_state(args.zo_method())
        return trainer, copy.deepcopy(hf), model.state_dict(), method_state


@pytest.mark.parametrize("method", ["sign", "momentum", "adam", "sparse", "hizoo"])
def test_full_parameter_methods_equal_their_published_rule(classifier, tmp_path, method):
    _, hf, _ = classifier
    trainer, ref_model, state, method_state = train_full_parameter(classifier, _args(tmp_path, method))
    params = dict(ref_model.named_parameters())
    ref = reference(ref_model, params, trainer.seen, method)
    for a, b in zip([h["projected_grads"][0] for h in trainer.zo_history], ref):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(b)), (a, b)
    assert max(max_abs_diff(state[n], p) for n, p in params.items()) <= 1e-6
    assert max(max_abs_diff(state[n], p) for n, p in hf.named_parameters()) > 1e-5  # it trained
    if method == "hizoo":  # the Hessian estimate moved away from its start (so the test sees it)
        assert max(float((keys["hessian"] - 1).abs().max()) for keys in method_state.values()) > 1e-3
        assert all("loss_at_theta" in h for h in trainer.zo_history)
    if method == "sparse":  # the largest 80 % of every tensor never moved
        for n, p in hf.named_parameters():
            frozen = p.abs() > sparse_threshold(p)
            assert torch.equal(state[n][frozen], p.detach()[frozen]), n


def train_lora_beside_peft(classifier, tmp_path, args):
    """MeZO on an engine adapter that PEFT also holds (the same random A and B): (trainer, the PEFT
    model, its trained tensors by saved name, the engine's tensors after training)."""
    from peft import LoraConfig, get_peft_model

    from sglang_hf_bridge.training.mezo import _peft_saved_name

    path, hf, rows = classifier
    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                              target_modules=["query", "value"],
                                                              init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    with SGLangRobertaForSequenceClassification.from_pretrained(path) as model:
        model.load_adapter(tmp_path / "adapter", adapter_name="task")
        trainer = RecordingMeZOTrainer(model=model, args=args, train_dataset=rows, data_collator=default_data_collator)
        trainer.train()
        params = {_peft_saved_name(n): p for n, p in peft_model.named_parameters()
                  if "lora_" in n or "modules_to_save" in n}
        return trainer, peft_model, params, model.adapter_tensors("task")


@pytest.mark.parametrize("method", ["adam", "sparse", "hizoo"])
def test_lora_methods_equal_peft_under_the_same_rule(classifier, tmp_path, method):
    trainer, peft_model, params, tensors = train_lora_beside_peft(
        classifier, tmp_path, _args(tmp_path / "out", method, zo_trainable="lora"))
    ref = reference(peft_model, params, trainer.seen, method)
    for a, b in zip([h["projected_grads"][0] for h in trainer.zo_history], ref):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(b)), (a, b)
    assert max(max_abs_diff(tensors[n], p) for n, p in params.items()) <= 1e-6


@pytest.mark.parametrize("method", ["sign", "momentum", "adam", "sparse", "hizoo", "conservative", "lozo"])
def test_resume_continues_the_methods_trajectory(classifier, tmp_path, method):
    """The method's state (moments, step counts, H, Sparse MeZO's thresholds) is saved with the
    checkpoint: training 2 steps, then resuming to 4, gives the weights of 4 uninterrupted steps.
    (LOZO-M across a redraw of V: test_zo_lowrank_conservative.py.)"""
    path, _, rows = classifier
    stateful = method not in ("sign", "conservative", "lozo")

    with SGLangRobertaForSequenceClassification.from_pretrained(path, enable_lora=False) as model:
        trainer = RecordingMeZOTrainer(model=model, args=_args(tmp_path / "whole", method), train_dataset=rows,
                                       data_collator=default_data_collator)
        trainer.train()
        whole = model.state_dict()
    with SGLangRobertaForSequenceClassification.from_pretrained(path, enable_lora=False) as model:
        args = _args(tmp_path / "part", method, save_strategy="steps", save_steps=2)
        args.max_steps = 2
        RecordingMeZOTrainer(model=model, args=args, train_dataset=rows, data_collator=default_data_collator).train()
    checkpoint = tmp_path / "part" / "checkpoint-2"
    assert (checkpoint / "zo_method.json").is_file()
    if stateful:
        assert (checkpoint / "zo_method_state.safetensors").is_file()
    with SGLangRobertaForSequenceClassification.from_pretrained(path, enable_lora=False) as model:
        trainer = RecordingMeZOTrainer(model=model, args=_args(tmp_path / "part", method), train_dataset=rows,
                                       data_collator=default_data_collator)
        trainer.train(resume_from_checkpoint=str(checkpoint))
        resumed = model.state_dict()
    assert max(max_abs_diff(resumed[n], whole[n]) for n in whole) <= 1e-6


class HalvedSign(ZOMethod):
    """A user's rule, as a class: sign steps at half the learning rate."""

    name = "halved-sign"

    def projected_gradient(self, g: float) -> float:
        return math.copysign(1.0, g) if g else 0.0

    def update(self, name, theta, grad, lr, weight_decay, state):
        super().update(name, theta, grad, lr / 2, weight_decay, state)


def test_a_users_method_is_a_class(classifier, tmp_path):
    """The protocol is the extension point: a subclass overriding two hooks trains as its rule says
    (sign steps at half the learning rate = the sign reference at lr / 2)."""
    path, hf, rows = classifier
    with SGLangRobertaForSequenceClassification.from_pretrained(path, enable_lora=False) as model:
        trainer = RecordingMeZOTrainer(model=model, args=_args(tmp_path, HalvedSign()), train_dataset=rows,
                                       data_collator=default_data_collator)
        trainer.train()
        ref_model = copy.deepcopy(hf)
        params = dict(ref_model.named_parameters())
        global LR
        saved, LR = LR, LR / 2
        try:
            reference(ref_model, params, trainer.seen, "sign")
        finally:
            LR = saved
        state = model.state_dict()
        assert max(max_abs_diff(state[n], p) for n, p in params.items()) <= 1e-6


def test_bad_method_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="zo_optimizer must be one of"):
        MeZOTrainingArguments(output_dir=str(tmp_path), zo_optimizer="lbfgs", report_to=[])
    with pytest.raises(ValueError, match="sparsity"):
        MeZOTrainingArguments(output_dir=str(tmp_path), zo_optimizer="sparse", zo_sparsity=1.5, report_to=[])


def test_state_above_the_limit_is_refused_before_training(classifier, tmp_path):
    path, hf, rows = classifier
    with SGLangRobertaForSequenceClassification.from_pretrained(path, enable_lora=False) as model:
        before = model.state_dict()
        trainer = RecordingMeZOTrainer(model=model, args=_args(tmp_path, "adam", zo_method_state_limit_mb=0.01),
                                       train_dataset=rows, data_collator=default_data_collator)
        with pytest.raises(MemoryError, match="zo_method_state_limit_mb"):
            trainer.train()
        after = model.state_dict()
        assert all(torch.equal(before[n], after[n]) for n in before)  # nothing moved


@pytest.mark.parametrize("paired", [True, False])
def test_prompt_lora_paired_batch_and_unpaired_give_the_same_trajectory(tmp_path, tokenizer, paired):
    """The paired +/- batch (two scratch adapters in one engine batch) perturbs along the trained
    adapter's method directions (Sparse MeZO's mask from the trained adapter), as the unpaired
    passes do: both equal the reference on PEFT."""
    from conftest import mezo_setup
    from peft import LoraConfig, get_peft_model
    from test_mezo import _train

    from sglang_hf_bridge import SGLangRobertaForMaskedLM
    from sglang_hf_bridge.training.prompts import PromptClassifier

    path, hf, rows, template, label_ids = mezo_setup(_Factory(tmp_path), tokenizer, "zo-prompt", 16)
    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                              init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    with SGLangRobertaForMaskedLM.from_pretrained(path) as model:
        model.load_adapter(tmp_path / "adapter", adapter_name="task")
        trainer = _train(model, tokenizer, rows, template, label_ids, tmp_path / "run", zo_paired_batch=paired,
                         zo_optimizer="sparse", zo_sparsity=SPARSITY)
        assert trainer._paired() is paired
        params = {n.replace(".default", ""): p for n, p in peft_model.named_parameters() if "lora_" in n}
        clf = PromptClassifier(peft_model, label_ids, tokenizer.mask_token_id)
        ref = reference(_PromptModel(clf), params, trainer.seen, "sparse", steps=3)
        for a, b in zip([h["projected_grads"][0] for h in trainer.zo_history], ref):
            assert abs(a - b) <= 1e-3 * max(1.0, abs(b)), (a, b)
        tensors = model.adapter_tensors("task")
        assert max(max_abs_diff(tensors[n], p) for n, p in params.items()) <= 1e-6


class _Factory:
    """tmp_path_factory's one method, for a helper that wants one."""

    def __init__(self, root):
        self.root = root

    def mktemp(self, name):
        path = self.root / name
        path.mkdir()
        return path


class _PromptModel:
    """A prompt classifier seen as the reference's model: label-word logits and labels."""

    def __init__(self, clf):
        self.clf = clf

    def __call__(self, input_ids, attention_mask):
        return type("Out", (), {"logits": self.clf.label_logits(input_ids, attention_mask)})()


@pytest.mark.parametrize("method", ["adam", "sparse"])
def test_n_spsa_averages_the_directions_into_one_update(classifier, tmp_path, method):
    """zo_num_samples=2: the gradient estimate is the mean of g_i * direction_i, one update per step."""
    path, hf, rows = classifier
    with SGLangRobertaForSequenceClassification.from_pretrained(path, enable_lora=False) as model:
        trainer = RecordingMeZOTrainer(model=model, args=_args(tmp_path, method, zo_num_samples=2, max_steps=2),
                                       train_dataset=rows, data_collator=default_data_collator)
        trainer.train()
        ref_model = copy.deepcopy(hf)
        params = dict(ref_model.named_parameters())
        reference(ref_model, params, trainer.seen, method, samples=2)
        state = model.state_dict()
        assert max(max_abs_diff(state[n], p) for n, p in params.items()) <= 1e-6


def test_half_precision_lora_keeps_the_methods_state_on_float32_master_copies(classifier, tmp_path):
    """A bf16 model's LoRA trains on float32 master copies: replaying the measured projected
    gradients through torch's AdamW in float32 gives the masters exactly, and the engine holds
    them rounded to bf16."""
    from peft import LoraConfig, get_peft_model

    path, hf, rows = classifier
    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                              target_modules=["query", "value"],
                                                              init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    with SGLangRobertaForSequenceClassification.from_pretrained(path, dtype=torch.bfloat16) as model:
        model.load_adapter(tmp_path / "adapter", adapter_name="task")
        initial = {n: t.float() for n, t in model.adapter_state_dict("task").items()}  # the masters' start
        trainer = RecordingMeZOTrainer(model=model, args=_args(tmp_path / "out", "adam", zo_trainable="lora"),
                                       train_dataset=rows, data_collator=default_data_collator)
        trainer.train()
        master = trainer.zo_target().master
        params = {n: t.float().clone() for n, t in initial.items()}
        optimizer = torch.optim.AdamW([{"params": [p for n, p in params.items() if not no_decay(n)],
                                        "weight_decay": WD},
                                       {"params": [p for n, p in params.items() if no_decay(n)], "weight_decay": 0.0}],
                                      lr=LR, betas=(0.9, 0.999), eps=1e-8)
        for step, record in enumerate(trainer.zo_history):
            seed = zlib.crc32(f"{SEED}:{step}:0".encode())
            for n, p in params.items():
                p.grad = record["projected_grads"][0] * z_of(seed, n, p.shape)
            optimizer.step()
        assert set(master) == set(params)
        assert max(max_abs_diff(master[n], p) for n, p in params.items()) <= 1e-6
        assert max(max_abs_diff(master[n], initial[n]) for n in params) > 1e-5  # it trained
        tensors = model.adapter_state_dict("task")
        assert all(torch.equal(tensors[n], master[n].to(torch.bfloat16)) for n in params)


def _method_store_keys(engine):
    return sorted(engine.__dict__.get("zo_method_state", {}))


def test_an_adapters_method_state_goes_with_it_and_sparse_warns_on_zero_tensors(classifier, tmp_path, caplog):
    """The method state of an adapter lives on the ranks beside its matrices: deleting the adapter
    frees it. Sparse MeZO on a fresh adapter (B = 0) says that B's threshold is 0."""
    import logging

    path, _, rows = classifier
    with SGLangRobertaForSequenceClassification.from_pretrained(path) as model:
        from peft import LoraConfig

        model.add_adapter(LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]), adapter_name="t")
        lora_id = model.adapter_info("t").lora_id
        with caplog.at_level(logging.WARNING, logger="sglang_hf_bridge.training.zo_methods"):
            RecordingMeZOTrainer(model=model, args=_args(tmp_path, "sparse", zo_trainable="lora", max_steps=1),
                                 train_dataset=rows, data_collator=default_data_collator).train()
        assert "all zeros at the start" in caplog.text and "lora_B" in caplog.text
        assert lora_id in model.runtime.collective_rpc(_method_store_keys)[0]
        model.delete_adapter("t")
        assert lora_id not in model.runtime.collective_rpc(_method_store_keys)[0]
