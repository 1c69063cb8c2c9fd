"""LOZO, LOZO-M and ZO-SGD-Cons equal their published rules: references written here from the
authors' code (LOZO's ``lowrank_zo_perturb_parameters`` / ``lowrank_zo_update`` /
``lowrank_zo_update_momentum``, ZO-Bench's ``zo_conserv_step``) on transformers + plain torch, with the
same seeds, full-parameter on the engine and LoRA against PEFT; LOZO-M's momentum survives a resume
across a resample of V; the methods' state is announced and bounded."""

from __future__ import annotations

import copy
import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from conftest import max_abs_diff
from test_mezo import EPS, SEED, WD, RecordingMeZOTrainer, z_of
from test_zo_methods import _args as method_args
from test_zo_methods import build_classifier, no_decay, train_full_parameter, train_lora_beside_peft
from transformers import default_data_collator

from sglang_hf_bridge import SGLangRobertaForSequenceClassification
from sglang_hf_bridge.training.zo_methods import ZOConservative

LR, STEPS, RANK, INTERVAL, BETA1 = 1e-3, 5, 2, 2, 0.9  # interval 2: V is resampled (and M projected) twice
# A learning rate large enough that steps are rejected (the test checks a choice was made) is large
# against the projected gradient's float32 rounding, ~1e-7 / (2 eps): eps 0.1 keeps lr x that small.
CONSERVATIVE_LR, CONSERVATIVE_STEPS, CONSERVATIVE_EPS = 0.05, 4, 0.1


def _seed(step: int) -> int:
    return zlib.crc32(f"{SEED}:{step}:0".encode())


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1))


def v_seed(step: int) -> int:
    """The documented V seed: one per interval, from (run seed, interval index)."""
    return (SEED * 1_000_003 + zlib.crc32(f"lozo-v/{step // INTERVAL}".encode())) % (2**63 - 1)


def lozo_factors(step: int, name: str, shape, interval_step=None):
    u = torch.randn(shape[0], RANK, generator=_generator(_seed(step), name))
    v = torch.randn(math.prod(shape[1:]), RANK,
                    generator=_generator(v_seed(step if interval_step is None else interval_step), name))
    return u, v


def _loss(model, batch) -> float:
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return float(F.cross_entropy(logits.float(), batch["labels"]))


def lozo_reference(model, params, batches, momentum: bool):
    """The authors' LOZO step: perturb by eps U V^T (1-D: eps z), two losses, restore, then
    ``lowrank_zo_update`` (theta -= lr (g U V^T + wd theta)) or ``lowrank_zo_update_momentum``
    (M in U-space, projected by V_old^T V / n when V is resampled)."""
    m_state, grads = {}, []
    for step, batch in enumerate(batches):
        with torch.no_grad():
            factors = {n: lozo_factors(step, n, p.shape) for n, p in params.items() if p.dim() >= 2}
            z = {n: (factors[n][0] @ factors[n][1].t()).view(p.shape) if n in factors else z_of(_seed(step), n, p.shape)
                 for n, p in params.items()}
            for n, p in params.items():
                p.add_(z[n], alpha=EPS)
            l_plus = _loss(model, batch)
            for n, p in params.items():
                p.add_(z[n], alpha=-2 * EPS)
            l_minus = _loss(model, batch)
            for n, p in params.items():
                p.add_(z[n], alpha=EPS)
            g = (l_plus - l_minus) / (2 * EPS)
            grads.append(g)
            for n, p in params.items():
                if not momentum:
                    direction = g * z[n]
                elif n in factors:
                    u, v = factors[n]
                    if n not in m_state:
                        m_state[n] = g * u
                    elif step % INTERVAL == 0:  # V resampled: carry M over through V_old^T V / n
                        v_old = lozo_factors(step, n, p.shape, interval_step=step - INTERVAL)[1]
                        m_state[n] = BETA1 * m_state[n] @ v_old.t() @ v / v_old.shape[0] + (1 - BETA1) * g * u
                    else:
                        m_state[n] = BETA1 * m_state[n] + (1 - BETA1) * g * u
                    direction = (m_state[n] @ v.t()).view(p.shape)
                else:
                    m_state[n] = g * z[n] if n not in m_state else BETA1 * m_state[n] + (1 - BETA1) * g * z[n]
                    direction = m_state[n]
                if no_decay(n):
                    p.sub_(direction, alpha=LR)
                else:
                    p.sub_(LR * (direction + WD * p))
    return grads


def conservative_reference(model, params, batches, lr, eps=EPS):
    """ZO-Bench's ``zo_conserv_step`` with torch's SGD (no weight decay): l0, l+, l-, then the
    update, its opposite, and their comparisons."""
    optimizer = torch.optim.SGD(list(params.values()), lr=lr)
    kept, grads = [], []
    for step, batch in enumerate(batches):
        seed = _seed(step)
        z = {n: z_of(seed, n, p.shape) for n, p in params.items()}

        def move(scale):
            for n, p in params.items():
                p.add_(scale * z[n])

        def update(sign):
            for n, p in params.items():
                p.grad = sign * g * z[n]
            optimizer.step()
            for p in params.values():
                p.grad = None

        with torch.no_grad():
            loss0 = _loss(model, batch)
            move(eps)
            l_plus = _loss(model, batch)
            move(-2 * eps)
            l_minus = _loss(model, batch)
            move(eps)
            g = (l_plus - l_minus) / (2 * eps)
            grads.append(g)
            update(1.0)
            loss1 = _loss(model, batch)
            update(-2.0)
            loss2 = _loss(model, batch)
            if loss1 > loss0:
                kept.append(0.0 if loss0 < loss2 else -1.0)
                if loss0 < loss2:
                    update(1.0)
            else:
                kept.append(1.0 if loss1 < loss2 else -1.0)
                if loss1 < loss2:
                    update(2.0)
    return grads, kept


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return build_classifier(tmp_path_factory.mktemp("zo-lowrank"), 71, 73, 48)


def _args(out, method, **extra):
    return method_args(out, method, **{"max_steps": STEPS, "zo_lozo_rank": RANK, "zo_lozo_interval": INTERVAL,
                                       "zo_lozo_beta1": BETA1, **extra})


def _check_grads(trainer, ref):
    measured = [h["projected_grads"][0] for h in trainer.zo_history]
    assert len(measured) == len(ref)
    for a, b in zip(measured, ref):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(b)), (a, b)


@pytest.mark.parametrize("method", ["lozo", "lozo-m"])
def test_full_parameter_lozo_equals_the_authors_rule(classifier, tmp_path, method):
    _, hf, _ = classifier
    trainer, ref_model, state, _ = train_full_parameter(classifier, _args(tmp_path, method))
    params = dict(ref_model.named_parameters())
    _check_grads(trainer, lozo_reference(ref_model, params, trainer.seen, momentum=method == "lozo-m"))
    assert max(max_abs_diff(state[n], p) for n, p in params.items()) <= 1e-6
    assert max(max_abs_diff(state[n], p) for n, p in hf.named_parameters()) > 1e-5  # it trained
    # The perturbation of a matrix is U V^T: rank RANK, where a full z has full rank.
    name = "roberta.encoder.layer.0.attention.self.query.weight"
    d = trainer.args.zo_method().draw(torch.empty(state[name].shape), _seed(0), name)
    assert torch.linalg.matrix_rank(d).item() == RANK < torch.linalg.matrix_rank(z_of(0, name, d.shape)).item()


@pytest.mark.parametrize("method", ["lozo", "lozo-m"])
def test_lora_lozo_equals_peft_under_the_same_rule(classifier, tmp_path, method):
    trainer, peft_model, params, tensors = train_lora_beside_peft(
        classifier, tmp_path, _args(tmp_path / "out", method, zo_trainable="lora"))
    _check_grads(trainer, lozo_reference(peft_model, params, trainer.seen, momentum=method == "lozo-m"))
    assert max(max_abs_diff(tensors[n], p) for n, p in params.items()) <= 1e-6


def test_full_parameter_conservative_equals_zo_bench(classifier, tmp_path):
    args = _args(tmp_path, "conservative", weight_decay=0.0, learning_rate=CONSERVATIVE_LR,
                 max_steps=CONSERVATIVE_STEPS, zo_eps=CONSERVATIVE_EPS)
    trainer, ref_model, state, _ = train_full_parameter(classifier, args)
    params = dict(ref_model.named_parameters())
    grads, kept = conservative_reference(ref_model, params, trainer.seen, CONSERVATIVE_LR, CONSERVATIVE_EPS)
    _check_grads(trainer, grads)
    assert [h["kept"] for h in trainer.zo_history] == kept
    assert len(set(kept)) > 1  # steps were kept and rejected: the choice is tested
    assert max(max_abs_diff(state[n], p) for n, p in params.items()) <= 1e-6


@pytest.mark.parametrize("paired", [True, False])
def test_prompt_lora_conservative_paired_and_unpaired(tmp_path, tokenizer, paired):
    """The candidate points are measured through the scratch adapters (paired) or in place: both
    keep what ZO-Bench keeps, on PEFT."""
    from conftest import mezo_setup
    from peft import LoraConfig, get_peft_model
    from test_zo_methods import _Factory, _PromptModel

    from sglang_hf_bridge import SGLangRobertaForMaskedLM
    from sglang_hf_bridge.training.prompts import PromptClassifier, PromptCollator

    path, hf, rows, template, label_ids = mezo_setup(_Factory(tmp_path), tokenizer, "zo-cons", 16)
    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                              init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    with SGLangRobertaForMaskedLM.from_pretrained(path) as model:
        model.load_adapter(tmp_path / "adapter", adapter_name="task")
        args = _args(tmp_path / "run", "conservative", zo_paired_batch=paired, weight_decay=0.0, max_steps=3,
                     learning_rate=3e-3, remove_unused_columns=False)
        trainer = RecordingMeZOTrainer(model=PromptClassifier(model, label_ids, tokenizer.mask_token_id), args=args,
                                       train_dataset=rows, data_collator=PromptCollator(tokenizer, template))
        trainer.train()
        assert trainer._paired() is paired
        params = {n.replace(".default", ""): p for n, p in peft_model.named_parameters() if "lora_" in n}
        clf = PromptClassifier(peft_model, label_ids, tokenizer.mask_token_id)
        grads, kept = conservative_reference(_PromptModel(clf), params, trainer.seen, 3e-3)
        _check_grads(trainer, grads)
        assert [h["kept"] for h in trainer.zo_history] == kept
        tensors = model.adapter_tensors("task")
        assert max(max_abs_diff(tensors[n], p) for n, p in params.items()) <= 1e-6


def test_conservative_weight_decay_is_decoupled_whatever_is_kept():
    """With weight decay the kept point is theta - lr (s g z + wd theta): the choice is ZO-Bench's."""
    choose = ZOConservative.choose
    assert choose(1.0, 0.9, 1.1) == 1.0  # the step is best
    assert choose(1.0, 1.2, 1.1) == 0.0  # both worse: stay
    assert choose(1.0, 1.2, 0.9) == -1.0  # the opposite is best
    assert choose(1.0, 1.0, 1.0) == -1.0  # ties: ZO-Bench keeps theta + lr g z


def test_lozo_m_resumes_across_a_resample_of_v(classifier, tmp_path):
    """LOZO-M's U-space momentum is saved whole (not split like theta) and V is a function of the
    step: 3 steps, save, resume to 5 (through the resample at step 4) = 5 uninterrupted steps."""
    path, _, rows = classifier
    with SGLangRobertaForSequenceClassification.from_pretrained(path, enable_lora=False) as model:
        RecordingMeZOTrainer(model=model, args=_args(tmp_path / "whole", "lozo-m"), train_dataset=rows,
                             data_collator=default_data_collator).train()
        whole = model.state_dict()
    with SGLangRobertaForSequenceClassification.from_pretrained(path, enable_lora=False) as model:
        args = _args(tmp_path / "part", "lozo-m", save_strategy="steps", save_steps=3)
        args.max_steps = 3
        RecordingMeZOTrainer(model=model, args=args, train_dataset=rows, data_collator=default_data_collator).train()
    checkpoint = tmp_path / "part" / "checkpoint-3"
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint / "zo_method_state.safetensors"))
    key = next(k for k in saved if "layer.0.attention.self.query.weight" in k and "momentum_u" in k)
    rows_out = model.config.hidden_size
    assert tuple(saved[key].shape) == (rows_out, RANK)  # [out rows, rank]: U-space, not the matrix
    with SGLangRobertaForSequenceClassification.from_pretrained(path, enable_lora=False) as model:
        trainer = RecordingMeZOTrainer(model=model, args=_args(tmp_path / "part", "lozo-m"), train_dataset=rows,
                                       data_collator=default_data_collator)
        trainer.train(resume_from_checkpoint=str(checkpoint))
        resumed = model.state_dict()
    assert max(max_abs_diff(resumed[n], whole[n]) for n in whole) <= 1e-6


def test_lozo_m_announces_its_u_space_state(classifier, tmp_path):
    """LOZO-M's state is rank / n of a matrix (and whole 1-D tensors): a limit between that and
    the trained parameters' size admits it, a smaller one refuses before anything moves."""
    path, hf, rows = classifier
    shapes = {n: tuple(p.shape) for n, p in hf.named_parameters()}
    from sglang_hf_bridge.training.zo_methods import ZOLowRankMomentum

    expected = ZOLowRankMomentum(rank=RANK).state_bytes(shapes)
    assert expected < 0.2 * 4 * sum(math.prod(s) for s in shapes.values())
    with SGLangRobertaForSequenceClassification.from_pretrained(path, enable_lora=False) as model:
        before = model.state_dict()
        trainer = RecordingMeZOTrainer(
            model=model, args=_args(tmp_path, "lozo-m", zo_method_state_limit_mb=expected / 2 / 2**20),
            train_dataset=rows, data_collator=default_data_collator)
        with pytest.raises(MemoryError, match="zo_method_state_limit_mb"):
            trainer.train()
        assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


def test_one_direction_methods_refuse_n_spsa(tmp_path, classifier):
    path, _, rows = classifier
    with SGLangRobertaForSequenceClassification.from_pretrained(path, enable_lora=False) as model:
        trainer = RecordingMeZOTrainer(model=model, args=_args(tmp_path, "conservative", zo_num_samples=2),
                                       train_dataset=rows, data_collator=default_data_collator)
        with pytest.raises(ValueError, match="one direction per step"):
            trainer.train()


def test_a_new_trainer_starts_the_methods_state_afresh(classifier, tmp_path):
    """The state lives beside the weights (on the engine's ranks), but it is the trainer's: a second
    MeZOTrainer on the same model starts from zero moments, as a new torch optimizer does -- its
    steps equal a first run's from the same weights."""
    path, _, rows = classifier
    with SGLangRobertaForSequenceClassification.from_pretrained(path, enable_lora=False) as model:
        first = _args(tmp_path / "a", "lozo-m", max_steps=2)
        RecordingMeZOTrainer(model=model, args=first, train_dataset=rows, data_collator=default_data_collator).train()
        model.save_pretrained(tmp_path / "after-first")
        RecordingMeZOTrainer(model=model, args=_args(tmp_path / "b", "lozo-m", max_steps=2), train_dataset=rows,
                             data_collator=default_data_collator).train()
        second = model.state_dict()
    with SGLangRobertaForSequenceClassification.from_pretrained(tmp_path / "after-first", enable_lora=False) as model:
        RecordingMeZOTrainer(model=model, args=_args(tmp_path / "c", "lozo-m", max_steps=2), train_dataset=rows,
                             data_collator=default_data_collator).train()
        fresh = model.state_dict()
    assert max(max_abs_diff(second[n], fresh[n]) for n in fresh) <= 1e-6
