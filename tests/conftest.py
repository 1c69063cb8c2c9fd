"""Shared fixtures: small random-weight checkpoints built from configs, saved to disk, loaded
back both by transformers (the oracle) and by the SGLang-backed model under test."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    CamembertConfig,
    CamembertForMaskedLM,
    RobertaConfig,
    RobertaForMaskedLM,
    XLMRobertaConfig,
    XLMRobertaForMaskedLM,
)

import sglang_hf_bridge  # noqa: F401  (configures SGLang before anything imports it)

# The engine caches its per-host GEMM choice (engine/gemm.py); tests keep it out of the home folder.
os.environ.setdefault("SGLANG_HF_BRIDGE_CACHE", os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                            f"sglang-hf-bridge-test-cache-{os.getuid()}"))

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SGLANG_HF_BRIDGE_DATA", REPO / "data"))
TOKENIZER_DIR = DATA / "tokenizers" / "roberta-base"

FAMILIES = {
    "roberta": (RobertaConfig, RobertaForMaskedLM),
    "xlm-roberta": (XLMRobertaConfig, XLMRobertaForMaskedLM),
    "camembert": (CamembertConfig, CamembertForMaskedLM),
}


def small_config(family: str = "roberta", **overrides):
    config_cls, _ = FAMILIES[family]
    kwargs = dict(
        vocab_size=50265,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=130,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        layer_norm_eps=1e-5,
    )
    kwargs.update(overrides)
    return config_cls(**kwargs)


def build_checkpoint(directory: Path, family: str = "roberta", seed: int = 0, **overrides):
    """Random-weight HF masked LM saved to ``directory``; returns the HF model (eval mode)."""
    _, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(small_config(family, **overrides)).eval()
    # Random LayerNorm/bias values so parity tests see every parameter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    if model.config.vocab_size == 50265:  # the real vocabulary: its tokenizer files travel along, as published
        save_tokenizer_files(directory)
    return model


def save_tokenizer_files(directory) -> None:
    """The RoBERTa tokenizer's files beside a checkpoint (where from_pretrained reads the mask token)."""
    for name in ("tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copyfile(TOKENIZER_DIR / name, Path(directory) / name)


SST2_SPLITS = DATA / "sst2" / "k-shot"  # LM-BFF k-shot splits shipped: 16-42, 512-42
SST2_K_SHOT = SST2_SPLITS / "16-42"


def sst2_train_rows(n=None):
    """The first ``n`` rows (all 32 by default) of the SST-2 k-shot training split in data/."""
    from sglang_hf_bridge.training import load_lmbff_tsv

    rows = load_lmbff_tsv(SST2_K_SHOT / "train.tsv")
    return rows[:n] if n else rows


def mezo_setup(tmp_path_factory, tokenizer, name: str, n_rows: int):
    """(checkpoint dir, HF model, SST-2 rows, default template, its label word ids) for MeZO tests."""
    from sglang_hf_bridge.training import PromptTemplate

    path = tmp_path_factory.mktemp(name)
    hf = build_checkpoint(path, "roberta", seed=31)
    template = PromptTemplate()
    return path, hf, sst2_train_rows(n_rows), template, template.label_word_ids(tokenizer)


@pytest.fixture(scope="session")
def tokenizer():
    if not TOKENIZER_DIR.is_dir():
        pytest.fail(f"RoBERTa tokenizer not found at {TOKENIZER_DIR}")
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="session")
def roberta_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("roberta-ckpt")
    hf = build_checkpoint(path, "roberta")
    return path, hf


@pytest.fixture(scope="module")
def roberta(roberta_checkpoint):
    """(HF model, SGLang-backed model) on the same random weights, shared by a test module.
    Module scope: SGLang has one parallel runtime per process, and the tensor-parallel tests
    need it free."""
    from sglang_hf_bridge import SGLangRobertaForMaskedLM

    path, hf = roberta_checkpoint
    model = SGLangRobertaForMaskedLM.from_pretrained(path)
    yield hf, model
    model.close()


def with_random_lora(model, config, seed: int = 1, std: float = 0.05):
    """``model`` wrapped by PEFT with ``config`` (in place, as ``get_peft_model`` does) and B matrices
    drawn (PEFT starts them at zero: the adapter would change nothing); returns (peft model, its
    LoRA tensors as ``load_adapter(adapter_state_dict=...)`` takes them)."""
    from peft import get_peft_model

    peft = get_peft_model(model, config).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    return peft, {k: v for k, v in peft.state_dict().items() if "lora_" in k}


def max_abs_diff(a, b) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def assert_pools_free(model):
    assert model.engine_pool_stats() == model.engine_pool_capacity()


def assert_forward_matches_hf(model, hf, enc, tol: float = 1e-5):
    """logits, loss (labels = the real tokens) and every hidden state equal transformers'."""
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    with torch.no_grad():
        ref = hf(**enc, labels=labels, output_hidden_states=True)
    out = model(**enc, labels=labels, output_hidden_states=True)
    assert max_abs_diff(out.logits, ref.logits) <= tol
    assert abs(out.loss.item() - ref.loss.item()) <= tol
    assert all(max_abs_diff(a, b) <= tol for a, b in zip(out.hidden_states, ref.hidden_states))
    return ref


def fill_mask_answers(result):
    """A fill-mask pipeline's answers (one text or many, one mask or several) as a flat list of
    (token, score rounded to 1e-5) for comparing two pipelines."""
    if isinstance(result, dict):
        return [(result["token"], round(result["score"], 5))]
    return [answer for item in result for answer in fill_mask_answers(item)]
