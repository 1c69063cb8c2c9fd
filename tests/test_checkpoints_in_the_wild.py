"""Checkpoints as people publish them, decided as transformers decides them: the owner's class name
in ``architectures``, extra heads beside the MLM head (pooler, NSP, task heads), configs written by
transformers 2.x/3.x (no ``model_type``), fewer layers in the config than in the weights, legacy
``LayerNorm.gamma``/``beta`` names in an old-torch ``.bin``, tiny vocabularies without tokenizer
files. The oracle is transformers' ``*ForMaskedLM.from_pretrained`` on the same directory: same
logits (1e-5), same fill-mask answers, same ``output_loading_info``. What transformers would
silently re-initialise (missing tensors) or refuse late, the bridge refuses at load, clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_checkpoint, fill_mask_answers, max_abs_diff
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForMaskedLM, BertForPreTraining, BertTokenizer, pipeline

from sglang_hf_bridge import (
    CheckpointError,
    InputValidationError,
    SGLangAutoModelForMaskedLM,
    SGLangBertForMaskedLM,
    SGLangRobertaForMaskedLM,
)

TOL = 1e-5
WORDS = ["the", "movie", "was", "good", "bad", "a", "film", "it", "great", "plot", "and", "i", "so", "very"]


def bert_dir(directory: Path, *, vocab_size: int = 64, layers: int = 2, cls=BertForMaskedLM, seed: int = 0,
             tokenizer: bool = True, **overrides):
    """A random-weight BERT (random biases and norms too) saved with its WordPiece tokenizer files."""
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=40, type_vocab_size=2, pad_token_id=0,
                        **overrides)
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    if tokenizer:
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
        vocab += [f"w{i}" for i in range(vocab_size - len(vocab))]
        (directory / "vocab.txt").write_text("\n".join(vocab[:vocab_size]) + "\n")
        BertTokenizer(str(directory / "vocab.txt")).save_pretrained(directory)
    return model


def edit_config(directory: Path, **changes) -> dict:
    """Rewrite config.json; a value of None removes the key (as old transformers never wrote it)."""
    data = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    (directory / "config.json").write_text(json.dumps(data))
    return data


def add_tensors(directory: Path, extra: dict) -> None:
    state = load_file(directory / "model.safetensors")
    state.update(extra)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})


def assert_same_as_transformers(model, reference, info, reference_info, texts=("the movie was [MASK] .",)):
    """Logits, fill-mask answers and output_loading_info equal transformers'."""
    ids = torch.tensor([[2, 5, 6, 7, 4, 3], [2, 9, 4, 11, 3, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask).logits
    got = model(input_ids=ids, attention_mask=mask).logits
    assert max_abs_diff(got[mask.bool()], want[mask.bool()]) <= TOL
    assert info == reference_info
    tokenizer = BertTokenizer.from_pretrained(model.name_or_path) if texts else None
    if tokenizer is not None:
        ours = pipeline("fill-mask", model=model, tokenizer=tokenizer)
        theirs = pipeline("fill-mask", model=reference, tokenizer=tokenizer)
        for text in texts:
            assert fill_mask_answers(ours(text, top_k=5)) == fill_mask_answers(theirs(text, top_k=5))


def load_both(directory: Path, ours=SGLangBertForMaskedLM, theirs=BertForMaskedLM):
    reference, reference_info = theirs.from_pretrained(directory, output_loading_info=True)
    model, info = ours.from_pretrained(directory, output_loading_info=True)
    return model, info, reference.eval(), reference_info


def test_owner_class_name_and_extra_heads_load_as_transformers(tmp_path, caplog):
    """architectures=["MyDomainBert"] over a BertForPreTraining checkpoint (pooler + NSP head) with
    the owner's extra task head beside the MLM head: the head is decided by the tensors present; the
    pooler, NSP and task heads are unexpected keys, logged and not loaded."""
    d = tmp_path / "domain-bert"
    bert_dir(d, cls=BertForPreTraining)
    edit_config(d, architectures=["MyDomainBert"])
    add_tensors(d, {"cls.sentiment.weight": torch.randn(3, 32), "cls.sentiment.bias": torch.randn(3)})
    with caplog.at_level("WARNING", logger="sglang_hf_bridge"):
        model, info, reference, reference_info = load_both(d)
    with model:
        assert info["unexpected_keys"] == {"bert.pooler.dense.weight", "bert.pooler.dense.bias",
                                           "cls.seq_relationship.weight", "cls.seq_relationship.bias",
                                           "cls.sentiment.weight", "cls.sentiment.bias"}
        assert "cls.sentiment.weight" in caplog.text and "were not used" in caplog.text
        assert_same_as_transformers(model, reference, info, reference_info)


def test_old_config_without_model_type(tmp_path):
    """A transformers 2.x/3.x config (no model_type): the family class reads it as its own family,
    the Auto class infers the family from the tensor names."""
    d = tmp_path / "old-bert"
    bert_dir(d)
    edit_config(d, model_type=None, transformers_version=None, architectures=["BertForMaskedLM"])
    model, info, reference, reference_info = load_both(d)
    with model:
        assert model.config.model_type == "bert"
        assert_same_as_transformers(model, reference, info, reference_info)
    with SGLangAutoModelForMaskedLM.from_pretrained(d) as auto:
        assert type(auto) is SGLangBertForMaskedLM


def test_auto_infers_roberta_from_tensor_names_and_names_the_way_out(tmp_path):
    d = tmp_path / "old-roberta"
    hf = build_checkpoint(d, "roberta", vocab_size=300)
    edit_config(d, model_type=None)
    assert SGLangAutoModelForMaskedLM.class_for(d) is SGLangRobertaForMaskedLM
    with SGLangAutoModelForMaskedLM.from_pretrained(d) as model:
        ids = torch.tensor([[0, 10, 20, 30, 2]])
        assert max_abs_diff(model(ids).logits, hf(ids).logits) <= TOL
    # neither bert.* nor roberta.* names: the error says which class to name
    state = {k.replace("roberta.", "encoder_x.").replace("lm_head.", "head_x."): v
             for k, v in load_file(d / "model.safetensors").items()}
    save_file(state, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="SGLangBertForMaskedLM or SGLangRobertaForMaskedLM"):
        SGLangAutoModelForMaskedLM.from_pretrained(d)


def test_fewer_layers_in_config_than_in_weights(tmp_path):
    """transformers loads the first layers and reports the rest as unexpected; so does the bridge."""
    d = tmp_path / "fewer"
    bert_dir(d, layers=3)
    edit_config(d, num_hidden_layers=2)
    model, info, reference, reference_info = load_both(d)
    with model:
        assert any(k.startswith("bert.encoder.layer.2.") for k in info["unexpected_keys"])
        assert_same_as_transformers(model, reference, info, reference_info)


def test_tiny_vocabulary_old_bin_legacy_names_no_tokenizer(tmp_path):
    """A protein-style BERT: 25 tokens, weights in an old-torch (pre-1.6, non-zip) pytorch_model.bin
    with TF-era ``LayerNorm.gamma``/``beta`` names, no tokenizer files. Same logits as transformers;
    without a known mask id, the call that looks for masks names mask_token_id=."""
    d = tmp_path / "protein-bert"
    bert_dir(d, vocab_size=25, tokenizer=False)
    state = load_file(d / "model.safetensors")
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in state.items()}
    assert legacy.keys() != state.keys()
    (d / "model.safetensors").unlink()
    torch.save(legacy, d / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    model, info, reference, reference_info = load_both(d)
    with model:
        assert_same_as_transformers(model, reference, info, reference_info, texts=())
        ids = torch.tensor([[2, 5, 4, 7, 3]])
        with pytest.raises(InputValidationError, match="mask_token_id="):
            model.compute_mlm_logits(ids)
        got = model.compute_mlm_logits(ids, mask_token_id=4)
        assert max_abs_diff(got, reference(ids).logits[0, 2:3]) <= TOL
        model(ids)  # still usable
    edit_config(d, mask_token_id=4)  # the id from the config
    with SGLangBertForMaskedLM.from_pretrained(d) as model:
        assert model.compute_mlm_logits(ids).shape == (1, 25)


# ---------------------------------------------------------------------- refused, before any engine starts
@pytest.fixture(scope="module")
def good_bert(tmp_path_factory):
    d = tmp_path_factory.mktemp("good-bert")
    bert_dir(d)
    return d


def copy_dir(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("field, value, named", [
    ("hidden_size", 48, "config.hidden_size=48"),
    ("vocab_size", 80, "config.vocab_size=80"),
    ("max_position_embeddings", 64, "config.max_position_embeddings=64"),
    ("intermediate_size", 64, "config.intermediate_size=64"),
    ("type_vocab_size", 1, "config.type_vocab_size=1"),
])
def test_config_that_disagrees_with_its_weights(tmp_path, good_bert, field, value, named):
    d = copy_dir(good_bert, tmp_path / "ckpt")
    edit_config(d, **{field: value})
    with pytest.raises(RuntimeError):  # transformers refuses it too (size mismatch)
        BertForMaskedLM.from_pretrained(d)
    with pytest.raises(CheckpointError, match="disagree with its config.json") as e:
        SGLangBertForMaskedLM.from_pretrained(d)
    assert named in str(e.value) and "'bert." in str(e.value)


def test_one_tensor_of_the_wrong_shape(tmp_path, good_bert):
    d = copy_dir(good_bert, tmp_path / "ckpt")
    add_tensors(d, {"bert.encoder.layer.1.attention.self.key.weight": torch.randn(32, 16)})
    with pytest.raises(CheckpointError, match=r"'bert.encoder.layer.1.attention.self.key.weight': shape \[32, 16\] "
                                              r"in the checkpoint, \[32, 32\]"):
        SGLangBertForMaskedLM.from_pretrained(d)


def test_heads_that_do_not_divide_the_hidden_size(tmp_path, good_bert):
    d = copy_dir(good_bert, tmp_path / "ckpt")
    edit_config(d, num_attention_heads=5)
    with pytest.raises(ValueError, match="not a multiple"):
        BertForMaskedLM.from_pretrained(d)
    with pytest.raises(CheckpointError, match="not a multiple of the number of attention heads"):
        SGLangBertForMaskedLM.from_pretrained(d)


def test_missing_tensors_are_an_error_not_a_random_init(tmp_path, good_bert):
    d = copy_dir(good_bert, tmp_path / "ckpt")
    state = {k: v for k, v in load_file(d / "model.safetensors").items() if "layer.1.output.dense" not in k}
    save_file(state, d / "model.safetensors")
    _, reference_info = BertForMaskedLM.from_pretrained(d, output_loading_info=True)
    assert reference_info["missing_keys"]  # transformers initialises them randomly
    with pytest.raises(CheckpointError, match="bert.encoder.layer.1.output.dense.weight.*randomly"):
        SGLangBertForMaskedLM.from_pretrained(d)
    headless = {k: v for k, v in state.items() if not k.startswith("cls.")}
    save_file(headless, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="no cls.predictions.* tensors.*convert"):
        SGLangBertForMaskedLM.from_pretrained(d)


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_corrupt_weights_name_the_file(tmp_path, good_bert, damage):
    d = copy_dir(good_bert, tmp_path / "ckpt")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"\x07" * 64}[damage])
    with pytest.raises(CheckpointError, match=str(f)):
        SGLangBertForMaskedLM.from_pretrained(d)
