"""Bad input gets a clear error naming the problem, and the model keeps working afterwards."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_pools_free, build_checkpoint, max_abs_diff
from transformers import RobertaConfig, RobertaModel

from sglang_hf_bridge import CheckpointError, InputValidationError, SGLangRobertaForMaskedLM


def _still_works(hf, model):
    ids = torch.tensor([[0, 100, 200, 2]])
    with torch.no_grad():
        ref = hf(ids).logits
    assert max_abs_diff(model(ids).logits, ref) <= 1e-5
    assert_pools_free(model)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"input_ids": torch.randint(3, 100, (1, 129))}, "sequence too long"),
        ({"input_ids": torch.zeros((0, 5), dtype=torch.long)}, "empty batch"),
        ({"input_ids": torch.zeros((2, 0), dtype=torch.long)}, "empty sequence"),
        ({"input_ids": torch.tensor([[0, 5, 2]]), "attention_mask": torch.tensor([[0, 0, 0]])}, "no tokens"),
        ({"input_ids": torch.tensor([[0, 50265, 2]])}, "out of the vocabulary"),
        ({"input_ids": torch.tensor([[0, -1, 2]])}, "out of the vocabulary"),
        ({"input_ids": torch.tensor([0, 5, 2])}, r"shape \[batch, seq_len\]"),
        ({"input_ids": torch.tensor([[0.0, 5.0, 2.0]])}, "must hold integers"),
        ({"input_ids": torch.tensor([[0, 5, 2]]), "attention_mask": torch.ones((1, 4), dtype=torch.long)},
         "attention_mask has shape"),
        ({"input_ids": torch.tensor([[0, 5, 2]]), "attention_mask": torch.tensor([[1, 2, 1]])}, "only 0 and 1"),
        ({"input_ids": torch.tensor([[0, 5, 2]]), "token_type_ids": torch.tensor([[0, 1, 0]])}, "token_type_ids"),
        ({"input_ids": torch.tensor([[0, 5, 2]]), "position_ids": torch.tensor([[0, 1, 500]])}, "position id"),
        ({"input_ids": "hello"}, "input_ids"),
    ],
)
def test_forward_rejects_bad_input(roberta, kwargs, message):
    hf, model = roberta
    with pytest.raises(InputValidationError, match=message):
        model(**kwargs)
    _still_works(hf, model)


def test_compute_mlm_logits_rejects_bad_input(roberta):
    hf, model = roberta
    with pytest.raises(InputValidationError, match="sequence too long"):
        model.compute_mlm_logits(torch.randint(3, 100, (2, 200)))
    with pytest.raises(InputValidationError, match="empty batch"):
        model.compute_mlm_logits(torch.zeros((0, 3), dtype=torch.long))
    _still_works(hf, model)


def test_unsupported_arguments(roberta):
    hf, model = roberta
    ids = torch.tensor([[0, 5, 2]])
    with pytest.raises(InputValidationError, match="output_attentions"):
        model(ids, output_attentions=True)
    with pytest.raises(InputValidationError, match="inputs_embeds"):
        model(inputs_embeds=torch.zeros(1, 3, 64))
    with pytest.raises(TypeError, match="unexpected keyword"):
        model(ids, banana=1)
    _still_works(hf, model)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        SGLangRobertaForMaskedLM.from_pretrained(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        SGLangRobertaForMaskedLM.from_pretrained(tmp_path)


def test_file_instead_of_directory(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a directory"):
        SGLangRobertaForMaskedLM.from_pretrained(f)


def test_encoder_without_mlm_head(tmp_path):
    cfg = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=40)
    RobertaModel(cfg).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="masked-LM head"):
        SGLangRobertaForMaskedLM.from_pretrained(tmp_path)


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="model_type 'gpt2' is not supported"):
        SGLangRobertaForMaskedLM.from_pretrained(tmp_path)


def test_no_weight_files(tmp_path):
    build_checkpoint(tmp_path, "roberta")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        SGLangRobertaForMaskedLM.from_pretrained(tmp_path)


def test_missing_tensor_is_reported_and_nothing_leaks(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from sglang_hf_bridge.sglang_models.encoder import SGLangBridgeEncoder

    build_checkpoint(tmp_path, "roberta")
    state = load_file(tmp_path / "model.safetensors")
    del state["roberta.encoder.layer.1.output.dense.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="lacks 1 tensor.*roberta.encoder.layer.1.output.dense.weight"):
        SGLangRobertaForMaskedLM.from_pretrained(tmp_path)  # refused before any engine starts
    # a load that fails inside the started engine releases it: a good load still works afterwards
    build_checkpoint(tmp_path, "roberta")

    def fail(self, weights):
        raise OSError("disk read failed")

    with monkeypatch.context() as m:
        m.setattr(SGLangBridgeEncoder, "load_weights", fail)
        with pytest.raises(OSError, match="disk read failed"):
            SGLangRobertaForMaskedLM.from_pretrained(tmp_path)
    with SGLangRobertaForMaskedLM.from_pretrained(tmp_path) as m:
        assert m(torch.tensor([[0, 5, 2]])).logits.shape == (1, 3, 50265)


def test_bad_load_arguments(roberta_checkpoint):
    path, _ = roberta_checkpoint
    with pytest.raises(ValueError, match="dtype"):
        SGLangRobertaForMaskedLM.from_pretrained(path, dtype="int8")
    with pytest.raises(ValueError, match="tp_size"):
        SGLangRobertaForMaskedLM.from_pretrained(path, tp_size=0)
    with pytest.raises(ValueError, match="worker_start_timeout_s must be a number > 0"):
        SGLangRobertaForMaskedLM.from_pretrained(path, worker_start_timeout_s=0)
    with pytest.raises(ValueError, match="max_num_tokens"):
        SGLangRobertaForMaskedLM.from_pretrained(path, max_num_tokens=8)
