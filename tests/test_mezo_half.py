"""MeZO in half precision. bfloat16 keeps ~3 significant digits: a weight update or an eps*z
perturbation smaller than half a unit in the last place of the weight is rounded away, and the
forward's own rounding (~4e-3 relative) swamps l+ - l- when eps is small. What the library does:

* full-parameter MeZO on a half-precision model is refused with a clear error;
* LoRA MeZO keeps float32 master copies of the adapter: the engine holds ``half(master + c*z)``,
  so restoring is exact and updates accumulate in float32;
* the projected gradient then follows float32's once eps clears bfloat16's resolution (1e-2
  here), and does not at eps = 1e-3 (shown below, the reason for the floor ``MeZOTrainer`` keeps).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import build_checkpoint
from peft import LoraConfig, get_peft_model

from sglang_hf_bridge import SGLangRobertaForMaskedLM
from sglang_hf_bridge.training.zo import EngineAdapterTarget, EngineWeightsTarget

LABEL_WORDS = [372, 6587]
SEEDS = range(10)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("mezo-half")
    hf = build_checkpoint(path, "roberta", seed=80)
    torch.manual_seed(1)
    get_peft_model(copy.deepcopy(hf), LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                 init_lora_weights=False)).save_pretrained(path / "adapter")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 50000, (16, 12), generator=g)
    ids[:, 0], ids[:, -1], ids[:, 5] = 0, 2, 50264
    return path, ids, torch.randint(0, 2, (16,), generator=g)


def projected_gradients(model, target, ids, labels, eps):
    def loss():
        return float(F.cross_entropy(model.compute_mlm_logits(ids, vocab_ids=LABEL_WORDS).float(), labels))

    out = []
    for seed in SEEDS:
        target.perturb(seed, eps)
        plus = loss()
        target.perturb(seed, -2 * eps)
        minus = loss()
        target.perturb(seed, eps)
        out.append((plus - minus) / (2 * eps))
    return torch.tensor(out)


def correlation(a, b) -> float:
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_full_parameter_mezo_in_bfloat16_is_refused(checkpoint):
    path, _, _ = checkpoint
    with SGLangRobertaForMaskedLM.from_pretrained(path, dtype=torch.bfloat16, enable_lora=False) as model:
        with pytest.raises(ValueError, match="full-parameter MeZO on a bfloat16 model is refused"):
            EngineWeightsTarget(model)


def test_lora_mezo_in_bfloat16_follows_float32(checkpoint):
    path, ids, labels = checkpoint
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        with SGLangRobertaForMaskedLM.from_pretrained(path, dtype=dtype) as model:
            model.load_adapter(path / "adapter", adapter_name="a")
            target = EngineAdapterTarget(model, "a")
            assert (target.master is None) == (dtype == torch.float32)
            start = model.adapter_state_dict("a")
            for eps in (1e-3, 1e-2):
                grads[(dtype, eps)] = projected_gradients(model, target, ids, labels, eps)
            after = model.adapter_state_dict("a")
            if target.master is not None:  # restoring from the master copies is exact
                assert all(torch.equal(after[n], start[n]) for n in start)
                target.update(3, 1e-2, 0.5, 0.0)
                stored = model.adapter_state_dict("a")
                assert all(torch.equal(stored[n], target.master[n].to(torch.bfloat16)) for n in stored)
                assert any(not torch.equal(stored[n], start[n]) for n in stored)
    fp32, bf16 = grads[(torch.float32, 1e-2)], grads[(torch.bfloat16, 1e-2)]
    assert correlation(fp32, bf16) > 0.9, (fp32, bf16)
    assert (torch.sign(fp32) == torch.sign(bf16)).sum() >= 8
    # eps = 1e-3 is below bfloat16's resolution: the projected gradient is noise
    assert correlation(grads[(torch.float32, 1e-3)], grads[(torch.bfloat16, 1e-3)]) < 0.8


def test_mezo_losses_of_a_bfloat16_model_are_float32(checkpoint, tmp_path):
    """The bug this avoids: a bfloat16 model's cross-entropy is itself bfloat16 (steps of 2**-8 near
    0.7), so MeZO's l+ - l- at eps = 1e-3 read exactly 0 or +-2**-8 and the projected gradient took
    the values 0, +-1.95, +-3.9 (seen on the real MiniLM run). The losses MeZO uses are float32
    cross-entropies of the bfloat16 logits -- the model's own loss path and the paired-batch path."""
    from sglang_hf_bridge.training import MeZOTrainer, MeZOTrainingArguments, PromptClassifier

    path, ids, labels = checkpoint
    with SGLangRobertaForMaskedLM.from_pretrained(path, dtype=torch.bfloat16) as model:
        model.load_adapter(path / "adapter", adapter_name="a")
        clf = PromptClassifier(model, LABEL_WORDS, 50264)
        logits = clf.label_logits(ids)
        assert logits.dtype == torch.bfloat16
        exact = F.cross_entropy(logits.float(), labels)
        rounded = F.cross_entropy(logits, labels)
        assert rounded.dtype == torch.bfloat16 and float(rounded) != float(exact)  # what was used before
        out = clf(input_ids=ids, labels=labels)
        assert out["loss"].dtype == torch.float32 and float(out["loss"]) == float(exact)
        args = MeZOTrainingArguments(output_dir=str(tmp_path), zo_eps=1e-3, report_to=[], use_cpu=True,
                                     per_device_train_batch_size=16, remove_unused_columns=False)
        trainer = MeZOTrainer(model=clf, args=args)
        total, count = trainer._objective_sum(clf, {"input_ids": ids, "labels": labels})
        assert count == 16 and abs(total / count - float(exact)) <= 1e-6
        plus, minus, count = trainer._paired_sums(trainer.zo_target(), {"input_ids": ids, "attention_mask": None,
                                                                         "labels": labels}, seed=7)
        quantum = 2.0 ** -8
        assert plus != minus and abs((plus - minus) / count / quantum - round((plus - minus) / count / quantum)) > 1e-3
