"""What HF scripts, Trainer and pipelines call on a model: from_pretrained's transformers keywords,
the embeddings, sizes, state dicts, device/dtype moves, Trainer's loss keywords, the mask token a
checkpoint really uses, and the input checks that come with them. transformers is the oracle."""

from __future__ import annotations

import copy
import json
import logging
import tempfile

import pytest
import torch
from conftest import assert_pools_free, build_checkpoint, max_abs_diff, small_config
from torch import nn
from transformers import RobertaConfig, Trainer, TrainingArguments
from transformers.loss.loss_utils import ForMaskedLMLoss

from sglang_hf_bridge import (
    CheckpointError,
    InputValidationError,
    SGLangRobertaForMaskedLM,
    UnsupportedLoadOptionError,
    UnsupportedOperationError,
)
from sglang_hf_bridge.modeling.hf_surface import device_from_device_map

IDS = torch.tensor([[0, 11, 22, 33, 44, 2], [0, 55, 66, 2, 1, 1]])
MASK = (IDS != 1).long()


def _ref(hf, **kwargs):
    with torch.no_grad():
        return hf(IDS, attention_mask=MASK, **kwargs)


def _still_works(hf, model):
    assert max_abs_diff(model(IDS, attention_mask=MASK).logits, _ref(hf).logits) <= 1e-5
    assert_pools_free(model)


# ---------------------------------------------------------------------- tensor parallel (first: the
# module fixture below must not hold SGLang's process-wide parallel runtime yet)
def test_tp_embeddings_and_state_are_gathered_copies(tmp_path):
    hf = build_checkpoint(tmp_path, "roberta", seed=11)
    with SGLangRobertaForMaskedLM.from_pretrained(tmp_path, tp_size=2) as model:
        emb = model.get_input_embeddings()
        assert isinstance(emb, nn.Embedding) and emb.weight.shape == (50265, 64)
        assert max_abs_diff(emb.weight, hf.get_input_embeddings().weight) == 0.0
        out = model.get_output_embeddings()
        assert max_abs_diff(out.weight, hf.get_output_embeddings().weight) == 0.0
        assert max_abs_diff(out.bias, hf.get_output_embeddings().bias) == 0.0
        assert model.num_parameters() == hf.num_parameters()
        state, ref = model.state_dict(), hf.state_dict()
        assert set(state) == set(ref) and all(max_abs_diff(state[k], ref[k]) == 0.0 for k in ref)
        with torch.no_grad():
            emb.weight.zero_()  # a copy under TP: the engine is unchanged
        assert max_abs_diff(model(IDS, attention_mask=MASK).logits, _ref(hf).logits) <= 1e-5


# ---------------------------------------------------------------------- embeddings
def test_embeddings_are_views_of_the_engine(roberta, tokenizer):
    hf, model = roberta
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, nn.Embedding) and isinstance(out, nn.Linear)
    assert emb.weight.shape[0] == len(tokenizer) == model.config.vocab_size  # run_mlm.py's check
    assert max_abs_diff(emb.weight, hf.get_input_embeddings().weight) == 0.0
    assert max_abs_diff(out.weight, hf.get_output_embeddings().weight) == 0.0
    assert max_abs_diff(out.bias, hf.get_output_embeddings().bias) == 0.0
    engine_weight = model.runtime.model.embeddings.word_embeddings.weight
    assert emb.weight.data_ptr() == engine_weight.data_ptr()
    # in place through the view: the next forward uses it (as transformers' own model would)
    twin = copy.deepcopy(hf)
    saved = emb.weight[22].clone()
    try:
        with torch.no_grad():
            emb.weight[22] += 0.5
            twin.get_input_embeddings().weight[22] += 0.5
        assert max_abs_diff(model(IDS, attention_mask=MASK).logits, _ref(twin).logits) <= 1e-5
        assert max_abs_diff(model(IDS, attention_mask=MASK).logits, _ref(hf).logits) > 1e-3
    finally:
        with torch.no_grad():
            emb.weight[22] = saved
    _still_works(hf, model)


def test_resize_token_embeddings(roberta):
    hf, model = roberta
    assert isinstance(model.resize_token_embeddings(50265), nn.Embedding)
    assert model.resize_token_embeddings().weight.shape[0] == 50265
    with pytest.raises(UnsupportedOperationError, match="from 50265 to 50266 .*fixed"):
        model.resize_token_embeddings(50266)
    with pytest.raises(UnsupportedOperationError, match="to 50304"):
        model.resize_token_embeddings(50265, pad_to_multiple_of=64)
    with pytest.raises(UnsupportedOperationError, match="cannot be replaced"):
        model.set_input_embeddings(nn.Embedding(3, 64))
    _still_works(hf, model)


# ---------------------------------------------------------------------- sizes and state dicts
def test_sizes_match_transformers(roberta):
    hf, model = roberta
    for kwargs in ({}, {"exclude_embeddings": True}):
        assert model.num_parameters(**kwargs) == hf.num_parameters(**kwargs)
    assert model.get_memory_footprint(return_buffers=False) == hf.get_memory_footprint(return_buffers=False)
    assert model.can_generate() is False and SGLangRobertaForMaskedLM.can_generate() is False
    assert model.tie_weights() is None
    _still_works(hf, model)


def test_state_dict_and_load_state_dict(roberta):
    hf, model = roberta
    original, ref = model.state_dict(), hf.state_dict()
    assert set(original) == set(ref)
    assert all(max_abs_diff(original[k], ref[k]) == 0.0 for k in ref)
    assert set(model.state_dict(prefix="m.")) == {"m." + k for k in ref}
    twin = copy.deepcopy(hf)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.01 * torch.randn_like(p))
    try:
        assert str(model.load_state_dict(twin.state_dict())) == "<All keys matched successfully>"
        assert max_abs_diff(model(IDS, attention_mask=MASK).logits, _ref(twin).logits) <= 1e-5
        partial = {k: v for k, v in ref.items() if "layer.1." not in k}
        partial["not.a.weight"] = torch.zeros(1)
        with pytest.raises(RuntimeError, match="missing keys .*layer.1.*unexpected keys .*not.a.weight"):
            model.load_state_dict(partial)
        with pytest.raises(ValueError, match="shape"):
            model.load_state_dict({"lm_head.bias": torch.zeros(3)}, strict=False)
        result = model.load_state_dict(partial, strict=False)  # loads what is there
        assert result.unexpected_keys == ["not.a.weight"] and any("layer.1." in k for k in result.missing_keys)
    finally:
        model.load_state_dict(original)
    _still_works(hf, model)


# ---------------------------------------------------------------------- torch surface
def test_device_and_dtype_moves(roberta):
    hf, model = roberta
    for moved in (model.to("cpu"), model.to(torch.float32), model.to(torch.device("cpu"), dtype=torch.float32),
                  model.cpu(), model.float(), model.to(torch.zeros(1))):
        assert moved is model
    for cast in (model.half, model.bfloat16, model.double, lambda: model.to(torch.float16)):
        with pytest.raises(UnsupportedOperationError, match="runs in torch.float32.*at load time"):
            cast()
    for move in (model.cuda, lambda: model.to("cuda:0"), lambda: model.to("meta")):
        with pytest.raises(UnsupportedOperationError, match="runs on cpu.*at load time"):
            move()
    assert model.eval() is model and not model.training
    assert model.config.model_type == "roberta"
    _still_works(hf, model)


def test_gradient_checkpointing_is_a_logged_noop(roberta, caplog):
    hf, model = roberta
    with caplog.at_level(logging.INFO, logger="sglang_hf_bridge"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert "no activations" in caplog.text
    assert not model.is_gradient_checkpointing
    model.gradient_checkpointing_disable()
    assert [n for n, _ in model.named_parameters()] == ["_inference_only_guard"]  # no engine weight
    _still_works(hf, model)


# ---------------------------------------------------------------------- Trainer's loss keywords
def _labels():
    labels = torch.full_like(IDS, -100)
    labels[0, 2], labels[0, 4], labels[1, 1] = 22, 44, 55
    return labels


def test_num_items_in_batch_loss_matches_transformers(roberta):
    hf, model = roberta
    labels = _labels()
    ref = _ref(hf, labels=labels)
    # Trainer's count of this batch: the mean loss, as HF's RobertaForMaskedLM gives it
    out = model(IDS, attention_mask=MASK, labels=labels, num_items_in_batch=torch.tensor(3), return_loss=True)
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5
    # a count over accumulated batches: sum / num_items, as transformers' ForMaskedLMLoss
    for n in (7, torch.tensor(11)):
        expected = ForMaskedLMLoss(ref.logits, labels, 50265, num_items_in_batch=n)
        assert abs(model(IDS, attention_mask=MASK, labels=labels, num_items_in_batch=n).loss.item()
                   - expected.item()) <= 1e-5
    assert abs(model(IDS, attention_mask=MASK, labels=labels).loss.item() - ref.loss.item()) <= 1e-5
    _still_works(hf, model)


def test_trainer_evaluate_and_predict_match_transformers(roberta, tmp_path):
    hf, model = roberta
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(5):
        ids = torch.randint(3, 1000, (8,), generator=g)
        ids[0], ids[-1] = 0, 2
        labels = torch.full_like(ids, -100)
        labels[1 + i % 5], labels[6] = ids[1 + i % 5], ids[6]
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    results = []
    for m in (model, hf):
        args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_eval_batch_size=2, report_to=[],
                                 use_cpu=True)
        trainer = Trainer(model=m, args=args, eval_dataset=rows)
        results.append((trainer.evaluate()["eval_loss"], torch.as_tensor(trainer.predict(rows).predictions)))
    (ours, our_pred), (theirs, their_pred) = results
    assert abs(ours - theirs) <= 1e-5
    assert max_abs_diff(our_pred, their_pred) <= 1e-5
    _still_works(hf, model)


# ---------------------------------------------------------------------- from_pretrained's keywords
def test_transformers_keywords_are_honoured_or_ignored(roberta_checkpoint, caplog):
    path, hf = roberta_checkpoint
    config = copy.deepcopy(hf.config)
    config.output_hidden_states = True
    with caplog.at_level(logging.DEBUG, logger="sglang_hf_bridge"):
        model, info = SGLangRobertaForMaskedLM.from_pretrained(
            path, config=config, torch_dtype=torch.float32, device_map={"": "cpu"}, cache_dir="/nowhere",
            revision="main", token=None, use_auth_token=None, local_files_only=True, low_cpu_mem_usage=True,
            attn_implementation="eager", force_download=False, proxies=None, _fast_init=True,
            ignore_mismatched_sizes=False, from_tf=False, from_flax=False, trust_remote_code=False,
            use_safetensors=True, output_loading_info=True, max_memory=None, offload_folder=None,
            max_running_requests=4,  # an SGLang ServerArgs field: passed through
            worker_start_timeout_s=123,
        )
    with model:
        assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
        assert model.config.output_hidden_states and model.config is not config
        out, ref = model(IDS, attention_mask=MASK), _ref(hf, output_hidden_states=True)
        assert max_abs_diff(out.logits, ref.logits) <= 1e-5
        assert len(out.hidden_states) == len(ref.hidden_states)
        assert model.runtime.config.engine_options == {"max_running_requests": 4}
        assert model.runtime.config.start_timeout_s == 123.0
    # Hub options are honoured (a local directory needs no look-up, as in transformers); torch knobs ignored
    assert "ignoring cache_dir" not in caplog.text and "ignoring low_cpu_mem_usage" in caplog.text


@pytest.mark.parametrize("kwargs", [
    {"dtype": "float32", "device_map": "auto", "return_dict": False},
    {"torch_dtype": "auto", "device": torch.device("cpu"), "device_map": "cpu"},
    {"dtype": torch.float32, "torch_dtype": "float32", "device_map": {"": torch.device("cpu")}},
])
def test_dtype_device_map_and_config_keywords(roberta_checkpoint, kwargs):
    path, hf = roberta_checkpoint
    with SGLangRobertaForMaskedLM.from_pretrained(path, **kwargs) as model:
        assert model.dtype == torch.float32 and model.device == torch.device("cpu")
        out = model(IDS, attention_mask=MASK)
        logits = out[0] if kwargs.get("return_dict") is False else out.logits
        assert max_abs_diff(logits, _ref(hf).logits) <= 1e-5


def test_device_map_values():
    assert device_from_device_map(None) is None
    assert device_from_device_map("cpu") == "cpu"
    assert device_from_device_map({"": "cpu"}) == "cpu"
    assert device_from_device_map({"roberta": "cuda:0", "lm_head": "cuda:0"}) == "cuda:0"
    assert device_from_device_map(0) == torch.device("cuda", 0)
    assert device_from_device_map("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UnsupportedLoadOptionError, match="different devices"):
        device_from_device_map({"roberta": 0, "lm_head": "cpu"})
    with pytest.raises(UnsupportedLoadOptionError, match="disk"):
        device_from_device_map({"": "disk"})


@pytest.mark.parametrize("kwargs,message", [
    ({"from_tf": True}, "from_tf=True.*TensorFlow"),
    ({"from_flax": True}, "from_flax=True.*Flax"),
    ({"trust_remote_code": True}, "never runs code"),
    ({"quantization_config": {"load_in_8bit": True}}, "quantization_config.*dtype="),
    ({"state_dict": {"lm_head.bias": torch.zeros(3)}}, "state_dict=.*checkpoint directory"),
    ({"device_map": {"roberta": "cpu", "lm_head": "disk"}}, "device_map=.*one device"),
    ({"tp_plan": "auto"}, "tp_size=N"),
    ({"variant": "fp16"}, "variant"),
    ({"weights_only": False}, "weights_only=True"),
    ({"gguf_file": "model.gguf"}, "GGUF"),
])
def test_unsupported_keywords_are_refused(roberta, roberta_checkpoint, kwargs, message):
    hf, model = roberta
    with pytest.raises(UnsupportedLoadOptionError, match=message):
        SGLangRobertaForMaskedLM.from_pretrained(roberta_checkpoint[0], **kwargs)
    _still_works(hf, model)


def test_unknown_keyword_is_a_type_error(roberta, roberta_checkpoint):
    hf, model = roberta
    with pytest.raises(TypeError, match=r"from_pretrained\(\) got unexpected keyword argument\(s\) \['banana'\]"):
        SGLangRobertaForMaskedLM.from_pretrained(roberta_checkpoint[0], banana=1, from_tf=False)
    with pytest.raises(TypeError, match="positional"):
        SGLangRobertaForMaskedLM.from_pretrained(roberta_checkpoint[0], "extra")
    with pytest.raises(ValueError, match="dtype=.*torch_dtype=.*one of them"):
        SGLangRobertaForMaskedLM.from_pretrained(roberta_checkpoint[0], dtype="float32", torch_dtype=torch.float16)
    _still_works(hf, model)


def test_config_must_match_the_checkpoint(roberta, roberta_checkpoint):
    hf, model = roberta
    path = roberta_checkpoint[0]
    other = small_config("roberta", hidden_size=32)
    with pytest.raises(CheckpointError, match="hidden_size=32 does not match .*hidden_size=64"):
        SGLangRobertaForMaskedLM.from_pretrained(path, config=other)
    with pytest.raises(CheckpointError, match="model_type='bert'"):
        from transformers import BertConfig

        SGLangRobertaForMaskedLM.from_pretrained(path, config=BertConfig(vocab_size=50265, hidden_size=64))
    with pytest.raises(CheckpointError, match="num_hidden_layers=4 does not match"):
        SGLangRobertaForMaskedLM.from_pretrained(path, num_hidden_layers=4)
    with pytest.raises(TypeError, match="PretrainedConfig or a path"):
        SGLangRobertaForMaskedLM.from_pretrained(path, config=42)
    _still_works(hf, model)


def test_untied_decoder_surface(tmp_path):
    hf = build_checkpoint(tmp_path, "roberta", seed=12, tie_word_embeddings=False)
    with torch.no_grad():
        hf.lm_head.decoder.weight.add_(0.02 * torch.randn_like(hf.lm_head.decoder.weight))
    hf.save_pretrained(tmp_path)
    with SGLangRobertaForMaskedLM.from_pretrained(tmp_path) as model:
        out = model.get_output_embeddings()
        assert max_abs_diff(out.weight, hf.get_output_embeddings().weight) == 0.0
        assert max_abs_diff(model.get_input_embeddings().weight, hf.get_input_embeddings().weight) == 0.0
        # untied, transformers also counts lm_head.bias, which its forward never reads (the
        # decoder's bias is used); the engine holds only the bias that is used
        unused = hf.lm_head.bias.numel()
        for kwargs in ({}, {"exclude_embeddings": True}):
            assert model.num_parameters(**kwargs) == hf.num_parameters(**kwargs) - unused
        state, ref = model.state_dict(), hf.state_dict()
        assert set(state) == set(ref)
        assert all(max_abs_diff(state[k], ref[k]) == 0.0 for k in ref if k != "lm_head.bias")
        assert max_abs_diff(state["lm_head.bias"], ref["lm_head.decoder.bias"]) == 0.0
        twin = copy.deepcopy(hf)
        with torch.no_grad():
            twin.lm_head.decoder.bias.add_(0.5)
            twin.lm_head.bias.zero_()  # unused by transformers: must not reach the engine
        try:
            assert str(model.load_state_dict(twin.state_dict())) == "<All keys matched successfully>"
            assert max_abs_diff(model(IDS, attention_mask=MASK).logits, _ref(twin).logits) <= 1e-5
        finally:
            model.load_state_dict(ref)
        assert max_abs_diff(model(IDS, attention_mask=MASK).logits, _ref(hf).logits) <= 1e-5


def test_subfolder(tmp_path):
    hf = build_checkpoint(tmp_path / "repo" / "mlm", "roberta", seed=6)
    with SGLangRobertaForMaskedLM.from_pretrained(tmp_path / "repo", subfolder="mlm") as model:
        assert max_abs_diff(model(IDS, attention_mask=MASK).logits, _ref(hf).logits) <= 1e-5
    with pytest.raises(CheckpointError, match="does not exist"):
        SGLangRobertaForMaskedLM.from_pretrained(tmp_path / "repo", subfolder="nope")


# ---------------------------------------------------------------------- the mask token a checkpoint uses
BERT_VOCAB = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + \
    [f"w{i}" for i in range(96)]


@pytest.fixture(scope="module")
def bert_vocab_model():
    """A 200-token checkpoint whose tokenizer files say [MASK] = 103 (not vocab_size - 1)."""
    with tempfile.TemporaryDirectory() as d:
        from pathlib import Path

        path = Path(d)
        hf = build_checkpoint(path, "roberta", seed=8, vocab_size=200, pad_token_id=0, bos_token_id=101,
                              eos_token_id=102, type_vocab_size=2)
        (path / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
        (path / "tokenizer_config.json").write_text(json.dumps({"mask_token": "[MASK]", "pad_token": "[PAD]"}))
        model = SGLangRobertaForMaskedLM.from_pretrained(path)
        yield hf, model
        model.close()


def test_mask_token_from_tokenizer_files(bert_vocab_model):
    hf, model = bert_vocab_model
    assert model.mask_token_id == 103
    ids = torch.tensor([[101, 110, 103, 120, 102, 0], [101, 103, 130, 103, 140, 102]])
    mask = (ids != 0).long()
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
    out = model.compute_mlm_logits(ids, mask)
    assert out.shape == (3, 200)
    assert max_abs_diff(out, ref[ids == 103]) <= 1e-5
    # no mask anywhere: a clear error naming the id it looked for and how to pass another
    plain = torch.tensor([[101, 110, 199, 102]])
    with pytest.raises(InputValidationError, match=r"looked for id 103 \('\[MASK\]'.*mask_token_id=.*positions="):
        model.compute_mlm_logits(plain)
    assert model.compute_mlm_logits(plain, mask_token_id=199).shape == (1, 200)
    # the explicit argument, then model.mask_token_id, win over the files
    model.mask_token_id = 110
    try:
        assert max_abs_diff(model.compute_mlm_logits(ids, mask), ref[ids == 110]) <= 1e-5
        with pytest.raises(InputValidationError, match=r"looked for id 120 \(the mask_token_id argument\)"):
            model.compute_mlm_logits(plain, mask_token_id=120)
    finally:
        model.mask_token_id = 103
    assert max_abs_diff(model.compute_mlm_logits(ids, mask), ref[ids == 103]) <= 1e-5


def test_config_mask_token_id_wins_over_tokenizer_files(tmp_path):
    hf = build_checkpoint(tmp_path, "roberta", seed=9, vocab_size=200, pad_token_id=0, mask_token_id=7)
    (tmp_path / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    with SGLangRobertaForMaskedLM.from_pretrained(tmp_path) as model:
        assert model.mask_token_id == 7
        ids = torch.tensor([[101, 7, 103, 102]])
        with torch.no_grad():
            ref = hf(ids).logits
        assert max_abs_diff(model.compute_mlm_logits(ids), ref[ids == 7]) <= 1e-5


def test_sentence_pair_prompt_with_token_type_ids(bert_vocab_model):
    hf, model = bert_vocab_model
    ids = torch.tensor([[101, 110, 111, 102, 120, 103, 121, 102], [101, 130, 102, 103, 140, 141, 102, 0]])
    types = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, token_type_ids=types).logits
        plain_ref = hf(ids, attention_mask=mask).logits
    assert max_abs_diff(ref[ids == 103], plain_ref[ids == 103]) > 1e-3  # the types matter
    out = model.compute_mlm_logits(ids, mask, token_type_ids=types, vocab_ids=[150, 160])
    assert max_abs_diff(out, ref[ids == 103][:, [150, 160]]) <= 1e-5
    full = model.compute_mlm_logits(ids, mask, token_type_ids=types)
    assert max_abs_diff(full, ref[ids == 103]) <= 1e-5
    positions = torch.arange(2, 10).expand(2, 8).clone()
    with torch.no_grad():
        ref_pos = hf(ids, attention_mask=mask, token_type_ids=types, position_ids=positions).logits
    out_pos = model.compute_mlm_logits(ids, mask, token_type_ids=types, position_ids=positions)
    assert max_abs_diff(out_pos, ref_pos[ids == 103]) <= 1e-5
    with pytest.raises(InputValidationError, match="token_type_ids"):
        model.compute_mlm_logits(ids, mask, token_type_ids=types + 1)
    assert_pools_free(model)


# ---------------------------------------------------------------------- input validation gaps
@pytest.mark.parametrize("kwargs,message", [
    ({"position_ids": torch.tensor([[2, 3, -4, 5, 6, 7], [2, 3, 4, 5, 1, 1]])}, "position_ids must be >= 0, got -4"),
    ({"labels": torch.zeros((2, 6))}, "labels must hold integers, got dtype torch.float32"),
    ({"labels": torch.zeros((2, 6), dtype=torch.bool)}, "labels must hold integers, got dtype torch.bool"),
    ({"labels": torch.full((2, 6), 50265)}, r"label 50265 is neither a token id in \[0, 50265\)"),
    ({"labels": torch.full((2, 6), -1)}, "label -1 is neither .* ignore index -100"),
    ({"labels": torch.full((2, 6), -101)}, "label -101"),
    ({"labels": torch.zeros((2, 5), dtype=torch.long)}, "labels has shape"),
])
def test_forward_rejects(roberta, kwargs, message):
    hf, model = roberta
    with pytest.raises(InputValidationError, match=message):
        model(IDS, attention_mask=MASK, **kwargs)
    _still_works(hf, model)


@pytest.mark.parametrize("kwargs,message", [
    ({"vocab_ids": [372.7, 6587.0]}, "vocab_ids must hold integers, got dtype torch.float32"),
    ({"vocab_ids": torch.tensor([True, False])}, "vocab_ids must hold integers"),
    ({"mask_token_id": 50265}, r"mask_token_id=50265 is outside the vocabulary \[0, 50265\)"),
    ({"mask_token_id": -1}, "mask_token_id=-1 is outside"),
    ({"mask_token_id": 3.0}, "mask_token_id must hold integers"),
    ({"input_ids": IDS}, "no mask token in input_ids: looked for id 50264"),
    ({"position_ids": torch.full((2, 6), -2)}, "position_ids must be >= 0"),
])
def test_compute_mlm_logits_rejects(roberta, kwargs, message):
    hf, model = roberta
    ids = kwargs.pop("input_ids", torch.tensor([[0, 11, 50264, 44, 2, 1], [0, 50264, 66, 2, 1, 1]]))
    with pytest.raises(InputValidationError, match=message):
        model.compute_mlm_logits(ids, (ids != 1).long(), **kwargs)
    _still_works(hf, model)
    good = model.compute_mlm_logits(ids, (ids != 1).long(), positions=[[0, 1]], vocab_ids=[372, 6587])
    assert good.shape == (1, 2)


def test_mask_token_id_comes_from_the_checkpoints_tokenizer_files(roberta):
    _, model = roberta
    assert model.mask_token_id == 50264  # "<mask>" in vocab.json beside the weights (conftest)


def test_config_keywords_refused_when_they_change_the_engine():
    with pytest.raises(CheckpointError, match="vocab_size"):
        from sglang_hf_bridge.modeling.hf_surface import effective_config

        effective_config(RobertaConfig(vocab_size=100), None, {"vocab_size": 101})
