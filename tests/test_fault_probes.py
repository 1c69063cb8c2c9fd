"""What fault probes found: each bad input or interruption gets a clear error (or message)
naming the problem, and the model is usable afterwards. One engine for the module."""

from __future__ import annotations

import copy
import re
import signal

import pytest
import torch
from conftest import assert_pools_free, max_abs_diff, sst2_train_rows
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback

from sglang_hf_bridge import AdapterFileError, InputValidationError, SGLangRobertaForMaskedLM
from sglang_hf_bridge.training import (
    MeZOTrainer,
    MeZOTrainingArguments,
    PromptClassifier,
    PromptCollator,
    PromptTemplate,
)

MASK_ID = 50264  # RoBERTa's <mask>; the test checkpoints ship no tokenizer files to read it from
IDS = torch.tensor([[0, 5, 6, MASK_ID, 2], [0, 9, MASK_ID, 2, 1]])
MASK = (IDS != 1).long()
MAX_LORAS = 8  # from_pretrained's default, which the ``roberta`` fixture uses


def _still_works(hf, model):
    with torch.no_grad():
        ref = hf(IDS, attention_mask=MASK).logits
    assert max_abs_diff(model(IDS, attention_mask=MASK).logits, ref) <= 1e-5
    assert_pools_free(model)


def _engine_adapter_names(model):
    return sorted(a.name for a in model.runtime.adapters.adapters.values())


@pytest.fixture(scope="module")
def adapter_dir(roberta, tmp_path_factory):
    hf, _ = roberta
    path = tmp_path_factory.mktemp("probe-adapter")
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False)
    get_peft_model(copy.deepcopy(hf), config).save_pretrained(path)
    return path


def _copy_adapter(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# 1 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_corrupt_safetensors_names_the_file(roberta, adapter_dir, tmp_path, damage):
    hf, model = roberta
    bad = _copy_adapter(adapter_dir, tmp_path / "bad")
    weights = bad / "adapter_model.safetensors"
    data = weights.read_bytes()
    damaged = {"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"\x93NOT safetensors" * 64}
    weights.write_bytes(damaged[damage])
    with pytest.raises(AdapterFileError, match=re.escape(str(weights))):
        model.load_adapter(bad, adapter_name="probe")
    assert "probe" not in model.peft_config
    _still_works(hf, model)
    model.load_adapter(adapter_dir, adapter_name="probe")  # the same name, a good adapter: loads
    model.delete_adapter("probe")


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "\x00\xff\xfe"])
def test_malformed_adapter_config_names_the_file(roberta, adapter_dir, tmp_path, content):
    hf, model = roberta
    bad = _copy_adapter(adapter_dir, tmp_path / "bad")
    config = bad / "adapter_config.json"
    config.write_bytes(content.encode("latin-1"))
    with pytest.raises(AdapterFileError, match=re.escape(str(config))):
        model.load_adapter(bad, adapter_name="probe")
    _still_works(hf, model)
    model.load_adapter(adapter_dir, adapter_name="probe")
    model.delete_adapter("probe")


def test_corrupt_adapter_bin_names_the_file(roberta, adapter_dir, tmp_path):
    hf, model = roberta
    bad = _copy_adapter(adapter_dir, tmp_path / "bad")
    (bad / "adapter_model.safetensors").unlink()
    binary = bad / "adapter_model.bin"
    binary.write_bytes(b"PK\x03\x04 garbage, not a torch archive" * 8)
    with pytest.raises(AdapterFileError, match=re.escape(str(binary))):
        model.load_adapter(bad, adapter_name="probe")
    _still_works(hf, model)
    model.load_adapter(adapter_dir, adapter_name="probe")
    model.delete_adapter("probe")


# 2 ---------------------------------------------------------------------------------------------
class _Watch(TrainerCallback):
    """Records the adapters loaded at each step end; raises ``KeyboardInterrupt`` at step ``stop_at``."""

    def __init__(self, model, stop_at=None):
        self.model, self.stop_at, self.seen = model, stop_at, []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append(set(self.model.peft_config))
        if state.global_step == self.stop_at:
            raise KeyboardInterrupt("stop from a callback")


def _lora_trainer(model, tokenizer, out, callback, max_steps=2):
    template = PromptTemplate()
    args = MeZOTrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=max_steps,
                                 learning_rate=1e-3, lr_scheduler_type="constant", zo_eps=1e-3, seed=7, report_to=[],
                                 save_strategy="no", use_cpu=True, remove_unused_columns=False,
                                 zo_frozen_layer_cache=False)
    clf = PromptClassifier(model, template.label_word_ids(tokenizer), tokenizer.mask_token_id)
    return MeZOTrainer(model=clf, args=args, train_dataset=sst2_train_rows(16),
                       data_collator=PromptCollator(tokenizer, template), callbacks=[callback])


def _assert_only_user_adapters(model, names):
    assert sorted(model.peft_config) == sorted(names)
    assert _engine_adapter_names(model) == sorted(names)
    assert model.active_adapters() == ["task"]
    extra = [f"extra{i}" for i in range(MAX_LORAS - len(names))]  # every other slot is free again
    config = LoraConfig(r=2, target_modules=["value"])
    try:
        for name in extra:
            model.add_adapter(config, adapter_name=name)
    finally:
        model.delete_adapter([n for n in extra if n in model.peft_config])
    model.set_adapter("task")


def test_mezo_gives_back_its_scratch_adapters(roberta, adapter_dir, tokenizer, tmp_path):
    hf, model = roberta
    model.load_adapter(adapter_dir, adapter_name="task")
    try:
        before = model.adapter_state_dict("task")
        watch = _Watch(model)
        trainer = _lora_trainer(model, tokenizer, tmp_path / "run", watch)
        trainer.train()
        assert len(watch.seen) == 2 and all({"__zo_plus__", "__zo_minus__"} <= s for s in watch.seen)  # were used
        _assert_only_user_adapters(model, ["task"])
        after = model.adapter_state_dict("task")
        assert max(max_abs_diff(after[n], before[n]) for n in before) > 0  # trained

        # interrupted from a callback: freed too; then the same trainer trains again
        interrupted = _lora_trainer(model, tokenizer, tmp_path / "stop", _Watch(model, stop_at=1), max_steps=3)
        with pytest.raises(KeyboardInterrupt, match="stop from a callback"):
            interrupted.train()
        _assert_only_user_adapters(model, ["task"])
        watch.seen.clear()
        trainer.train()
        assert len(watch.seen) == 2 and all("__zo_plus__" in s for s in watch.seen)
        assert len(trainer.zo_history) == 4
        _assert_only_user_adapters(model, ["task"])
    finally:
        model.delete_adapter([n for n in model.peft_config])
    _still_works(hf, model)


# 3 ---------------------------------------------------------------------------------------------
def _then_sigint(real):
    """``real``, then a real Ctrl-C (SIGINT to this process) while the bridge is still inside it."""
    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        signal.raise_signal(signal.SIGINT)
        return result
    return wrapper


def test_interrupt_after_a_completed_load_or_delete_says_so(roberta, adapter_dir, monkeypatch):
    hf, model = roberta
    model.load_adapter(adapter_dir, adapter_name="ref")
    reference = model.compute_mlm_logits(IDS, MASK, mask_token_id=MASK_ID, adapter_names=["ref", "ref"])
    model.delete_adapter("ref")

    monkeypatch.setattr(model.runtime, "load_adapter", _then_sigint(model.runtime.load_adapter))
    with pytest.raises(KeyboardInterrupt, match="adapter 'x' finished loading: it is loaded and active"):
        model.load_adapter(adapter_dir, adapter_name="x")
    monkeypatch.undo()
    assert model.active_adapters() == ["x"] and _engine_adapter_names(model) == ["x"]
    loaded = model.compute_mlm_logits(IDS, MASK, mask_token_id=MASK_ID)  # the active adapter: x
    assert max_abs_diff(loaded, reference) == 0.0  # loaded whole, and in use

    monkeypatch.setattr(model.runtime, "unload_adapter", _then_sigint(model.runtime.unload_adapter))
    with pytest.raises(KeyboardInterrupt, match=r"deleting adapter\(s\) \['x'\]: the delete completed"):
        model.delete_adapter("x")
    monkeypatch.undo()
    assert "x" not in model.peft_config and _engine_adapter_names(model) == []
    _still_works(hf, model)
    model.load_adapter(adapter_dir, adapter_name="x")  # the retry a user makes works
    model.delete_adapter("x")


# 4 ---------------------------------------------------------------------------------------------
BAD_NAMES = [("", "must not be empty"), ("../x", "path separator"), ("a/b", "path separator"),
             ("a\\b", "path separator"), ("..", "'..'"), (" x", "whitespace"), ("x\n", "whitespace"),
             ("__base__", "reserved for the base model"), ("__zo_plus__", "reserved for MeZOTrainer"),
             ("__zo_mine", "reserved for MeZOTrainer"), (3, "must be a string")]


@pytest.mark.parametrize("how", ["load_adapter", "add_adapter"])
@pytest.mark.parametrize("name,rule", BAD_NAMES, ids=[repr(n) for n, _ in BAD_NAMES])
def test_bad_adapter_names_are_refused(roberta, adapter_dir, how, name, rule):
    hf, model = roberta
    load = (lambda n: model.load_adapter(adapter_dir, adapter_name=n)) if how == "load_adapter" else (
        lambda n: model.add_adapter(LoraConfig(r=4, target_modules=["query"]), adapter_name=n))
    with pytest.raises(ValueError, match=re.escape(f"invalid adapter name {name!r}") + ".*" + re.escape(rule)):
        load(name)
    assert dict(model.peft_config) == {} and _engine_adapter_names(model) == []
    _still_works(hf, model)
    load(None)  # None is PEFT's "default"
    assert model.active_adapters() == ["default"]
    model.delete_adapter("default")


# 5 ---------------------------------------------------------------------------------------------
def test_float_and_bool_attention_masks_match_hf(roberta):
    hf, model = roberta
    with torch.no_grad():
        ref = hf(IDS, attention_mask=MASK).logits
    for mask in (MASK.float(), MASK.bool(), MASK.half()):
        assert max_abs_diff(model(IDS, attention_mask=mask).logits, ref) <= 1e-5, mask.dtype
    with pytest.raises(InputValidationError, match=r"attention_mask must contain only 0 and 1, got 0\.5"):
        model(IDS, attention_mask=MASK.float() * 0.5)
    with pytest.raises(InputValidationError, match="attention_mask must contain only 0 and 1, got nan"):
        model(IDS, attention_mask=torch.full(IDS.shape, float("nan")))
    _still_works(hf, model)


# 6 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab_ids", [[], (), torch.tensor([], dtype=torch.long)], ids=["list", "tuple", "tensor"])
def test_empty_vocab_ids_says_empty(roberta, vocab_ids):
    hf, model = roberta
    with pytest.raises(InputValidationError, match="vocab_ids is empty: it needs at least one token id"):
        model.compute_mlm_logits(IDS, MASK, mask_token_id=MASK_ID, vocab_ids=vocab_ids)
    _still_works(hf, model)
    assert model.compute_mlm_logits(IDS, MASK, mask_token_id=MASK_ID, vocab_ids=[5, 6]).shape == (2, 2)


# 7 ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA (this one has it)")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda")])
def test_cuda_without_cuda_is_refused_up_front(roberta, roberta_checkpoint, device):
    hf, model = roberta
    path, _ = roberta_checkpoint
    with pytest.raises(ValueError, match=re.escape("CUDA is not available on this host "
                                                   "(torch.cuda.is_available() is False): pass device='cpu'")):
        SGLangRobertaForMaskedLM.from_pretrained(path, device=device)
    _still_works(hf, model)


# 8 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["input_ids", "attention_mask"])
def test_meta_tensors_are_refused(roberta, which):
    hf, model = roberta
    inputs = {"input_ids": IDS, "attention_mask": MASK}
    inputs[which] = inputs[which].to("meta")
    message = f"{which} is on the meta device"
    with pytest.raises(InputValidationError, match=message):
        model(**inputs)
    with pytest.raises(InputValidationError, match=message):
        model.compute_mlm_logits(**inputs, mask_token_id=MASK_ID)
    with pytest.raises(InputValidationError, match="vocab_ids is on the meta device"):
        model.compute_mlm_logits(IDS, MASK, mask_token_id=MASK_ID, vocab_ids=torch.tensor([5, 6]).to("meta"))
    _still_works(hf, model)
