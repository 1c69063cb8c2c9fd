"""Checkpoint formats and safety: legacy .bin files, no code from a checkpoint directory ever runs
(no prompt either), and the mask token read from tokenizer files as plain JSON/text."""

from __future__ import annotations

import builtins
import json
import zipfile

import pytest
import torch
from conftest import build_checkpoint, max_abs_diff
from transformers import AutoConfig, AutoModelForMaskedLM

from sglang_hf_bridge import CheckpointError, SGLangRobertaForMaskedLM, UnsupportedLoadOptionError
from sglang_hf_bridge.checkpoint import locate_checkpoint, read_mask_token_id

IDS = torch.tensor([[0, 11, 22, 33, 44, 2], [0, 55, 66, 2, 1, 1]])
MASK = (IDS != 1).long()

EVIL_CONFIG = """
import pathlib
pathlib.Path({marker!r}).write_text("checkpoint code ran")
from transformers import RobertaConfig


class EvilConfig(RobertaConfig):
    model_type = "roberta"
"""


def _ref(hf):
    with torch.no_grad():
        return hf(IDS, attention_mask=MASK).logits


@pytest.fixture
def no_prompt(monkeypatch):
    """Any interactive question ("run the custom code? [y/N]") fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a prompt was shown: {args}")

    monkeypatch.setattr(builtins, "input", refuse)


def _evil_checkpoint(path, model_type="roberta"):
    build_checkpoint(path, "roberta", seed=1)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (path / "config.json").write_text(json.dumps(config))
    marker = path / "EXECUTED"
    (path / "configuration_evil.py").write_text(EVIL_CONFIG.format(marker=str(marker)))
    return marker


# ---------------------------------------------------------------------- .bin formats
def test_legacy_bin_checkpoint_loads_like_transformers(tmp_path, monkeypatch):
    hf = build_checkpoint(tmp_path / "st", "roberta", seed=3)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    hf.config.save_pretrained(legacy)
    torch.save(hf.state_dict(), legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(legacy / "pytorch_model.bin")
    reference = AutoModelForMaskedLM.from_pretrained(legacy).eval()  # transformers reads it
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append((kwargs.get("weights_only"), kwargs.get("mmap")))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    with SGLangRobertaForMaskedLM.from_pretrained(legacy) as model:
        assert max_abs_diff(model(IDS, attention_mask=MASK).logits, _ref(reference)) <= 1e-5
    assert calls and all(weights_only is True and not mmap for weights_only, mmap in calls)


def test_zip_bin_is_memory_mapped_and_use_safetensors(tmp_path, monkeypatch):
    hf = build_checkpoint(tmp_path, "roberta", seed=4)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append((kwargs.get("weights_only"), kwargs.get("mmap")))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    assert locate_checkpoint(tmp_path).format == "safetensors"
    # use_safetensors=False prefers the .bin file, as transformers does
    with SGLangRobertaForMaskedLM.from_pretrained(tmp_path, use_safetensors=False) as model:
        assert max_abs_diff(model(IDS, attention_mask=MASK).logits, _ref(hf)) <= 1e-5
    assert calls and all(c == (True, True) for c in calls)
    # use_safetensors=True with only a .bin file: refused, naming the problem
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="use_safetensors=True but .* only pytorch_model.bin"):
        SGLangRobertaForMaskedLM.from_pretrained(tmp_path, use_safetensors=True)


def test_bin_that_is_not_a_state_dict(tmp_path):
    build_checkpoint(tmp_path, "roberta")
    (tmp_path / "model.safetensors").unlink()
    torch.save([torch.zeros(1)], tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a state dict"):
        SGLangRobertaForMaskedLM.from_pretrained(tmp_path)


# ---------------------------------------------------------------------- no code from the directory
def test_evil_config_file_really_runs_under_transformers(tmp_path):
    """Control for the tests below: transformers with trust_remote_code=True does run the file."""
    marker = _evil_checkpoint(tmp_path)
    AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    assert marker.exists()


@pytest.mark.parametrize("model_type", ["roberta", "evil"])
def test_auto_map_is_refused_without_prompt_or_import(tmp_path, no_prompt, monkeypatch, model_type):
    marker = _evil_checkpoint(tmp_path, model_type)
    import transformers

    def no_auto_config(*args, **kwargs):
        raise AssertionError("AutoConfig was asked to read a config with auto_map")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_auto_config)
    with pytest.raises(CheckpointError, match="auto_map .*configuration_evil.EvilConfig.*never runs code"):
        SGLangRobertaForMaskedLM.from_pretrained(tmp_path)
    assert not marker.exists()


def test_config_argument_with_auto_map_is_refused(tmp_path, no_prompt):
    marker = _evil_checkpoint(tmp_path / "evil")
    build_checkpoint(tmp_path / "good", "roberta")
    with pytest.raises(CheckpointError, match="auto_map"):
        SGLangRobertaForMaskedLM.from_pretrained(tmp_path / "good", config=str(tmp_path / "evil"))
    assert not marker.exists()


def test_trust_remote_code_true_is_refused(tmp_path, no_prompt):
    marker = _evil_checkpoint(tmp_path)
    with pytest.raises(UnsupportedLoadOptionError, match="trust_remote_code=True.*never runs code"):
        SGLangRobertaForMaskedLM.from_pretrained(tmp_path, trust_remote_code=True)
    assert not marker.exists()


def test_unknown_model_type_is_refused_before_transformers(tmp_path, no_prompt, monkeypatch):
    build_checkpoint(tmp_path, "roberta")
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "my-own-model"
    (tmp_path / "config.json").write_text(json.dumps(config))
    import transformers

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                        lambda *a, **k: pytest.fail("AutoConfig read an unsupported model_type"))
    with pytest.raises(CheckpointError, match="model_type 'my-own-model' is not supported"):
        SGLangRobertaForMaskedLM.from_pretrained(tmp_path)


def test_config_json_that_is_not_json(tmp_path):
    build_checkpoint(tmp_path, "roberta")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read .*config.json"):
        SGLangRobertaForMaskedLM.from_pretrained(tmp_path)


def test_good_checkpoint_reads_config_without_remote_code(tmp_path, no_prompt, monkeypatch):
    hf = build_checkpoint(tmp_path, "roberta", seed=5)
    import transformers

    seen = []
    real = transformers.AutoConfig.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", spy)
    with SGLangRobertaForMaskedLM.from_pretrained(tmp_path) as model:
        assert max_abs_diff(model(IDS, attention_mask=MASK).logits, _ref(hf)) <= 1e-5
    assert seen and all(flag is False for flag in seen)  # ours, and SGLang's own read


# ---------------------------------------------------------------------- mask token from tokenizer files
def _write(directory, name, data):
    directory.mkdir(parents=True, exist_ok=True)
    text = data if isinstance(data, str) else json.dumps(data)
    (directory / name).write_text(text, encoding="utf-8")


BERT_VOCAB = "\n".join(["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                       + [f"w{i}" for i in range(96)]) + "\n"


@pytest.mark.parametrize(
    "files,expected",
    [
        # BERT: vocab.txt only (BertTokenizer's default "[MASK]")
        ({"vocab.txt": BERT_VOCAB}, 103),
        # tokenizer_config.json names the token, vocab.txt gives its id
        ({"tokenizer_config.json": {"mask_token": "[MASK]"}, "vocab.txt": BERT_VOCAB}, 103),
        # AddedToken dict in special_tokens_map.json, id from vocab.json
        ({"special_tokens_map.json": {"mask_token": {"content": "<msk>", "lstrip": True}},
          "vocab.json": {"<s>": 0, "<msk>": 7, "a": 8}}, 7),
        # transformers >= 4.34 tokenizer_config.json: added_tokens_decoder
        ({"tokenizer_config.json": {"mask_token": "<mask>", "added_tokens_decoder": {
            "0": {"content": "<s>"}, "150": {"content": "<mask>", "special": True}}}}, 150),
        # tokenizer.json added_tokens
        ({"tokenizer.json": {"added_tokens": [{"id": 42, "content": "<mask>", "special": True}],
                             "model": {"vocab": {"<mask>": 9}}}}, 42),
        # tokenizer.json Unigram vocabulary (a list, the index is the id), token declared by the config
        ({"tokenizer_config.json": {"mask_token": "<MASKED>"},
          "tokenizer.json": {"added_tokens": [], "model": {"vocab": [["<s>", 0.0], ["x", -1.0], ["<MASKED>", 0.0]]}}},
         2),
        # tokenizer_config.json wins over special_tokens_map.json
        ({"tokenizer_config.json": {"mask_token": "[MASK]"}, "special_tokens_map.json": {"mask_token": "<mask>"},
          "vocab.json": {"<mask>": 5, "[MASK]": 6}}, 6),
    ],
)
def test_read_mask_token_id(tmp_path, files, expected):
    for name, data in files.items():
        _write(tmp_path, name, data)
    found = read_mask_token_id(str(tmp_path), vocab_size=200)
    assert found is not None and found[0] == expected
    assert found[1]  # says where it came from


def test_read_mask_token_id_ignores_what_it_cannot_use(tmp_path, caplog):
    assert read_mask_token_id(str(tmp_path), 200) is None  # no tokenizer files
    _write(tmp_path, "tokenizer.json", "{broken")
    _write(tmp_path, "tokenizer_config.json", {"mask_token": "<mask>"})
    assert read_mask_token_id(str(tmp_path), 200) is None  # broken JSON: a warning, not a crash
    assert "tokenizer.json" in caplog.text
    _write(tmp_path, "vocab.json", {"<mask>": 500})
    assert read_mask_token_id(str(tmp_path), 200) is None  # outside the model's vocabulary
    # a tokenizer's Python file is never imported
    _write(tmp_path, "tokenization_evil.py", "raise SystemExit('imported')")
    _write(tmp_path, "tokenizer_config.json", {"mask_token": "<mask>", "auto_map": {
        "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}})
    _write(tmp_path, "vocab.json", {"<mask>": 11})
    assert read_mask_token_id(str(tmp_path), 200)[0] == 11
