"""ModernBERT on the engine against transformers' ModernBERT classes on the same random weights:
the published shapes (fewer layers), odd shapes, the old and new config fields, batches mixing
5-token and 1,500-token sequences (the 128-token window matters), every head, saving, pipelines,
tensor parallelism, bf16, and the errors where something cannot run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TOKENIZER_DIR, max_abs_diff, save_tokenizer_files
from transformers import (
    ModernBertConfig,
    ModernBertForMaskedLM,
    ModernBertForQuestionAnswering,
    ModernBertForSequenceClassification,
    ModernBertForTokenClassification,
    ModernBertModel,
)

from sglang_hf_bridge import (
    SGLangAutoModel,
    SGLangAutoModelForMaskedLM,
    SGLangAutoModelForQuestionAnswering,
    SGLangAutoModelForSequenceClassification,
    SGLangAutoModelForTokenClassification,
)

TOL = 1e-5

# ModernBERT-base's config.json as published (transformers 4.47 fields: global/local rope theta,
# global_attn_every_n_layers), with fewer layers and a smaller vocabulary.
PUBLISHED_BASE = {
    "architectures": ["ModernBertForMaskedLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 50281, "classifier_activation": "gelu", "classifier_bias": False, "classifier_dropout": 0.0,
    "classifier_pooling": "mean", "cls_token_id": 50281, "decoder_bias": True, "deterministic_flash_attn": False,
    "embedding_dropout": 0.0, "eos_token_id": 50282, "global_attn_every_n_layers": 3, "global_rope_theta": 160000.0,
    "gradient_checkpointing": False, "hidden_activation": "gelu", "hidden_size": 768, "initializer_cutoff_factor": 2.0,
    "initializer_range": 0.02, "intermediate_size": 1152, "layer_norm_eps": 1e-05, "local_attention": 128,
    "local_rope_theta": 10000.0, "max_position_embeddings": 8192, "mlp_bias": False, "mlp_dropout": 0.0,
    "model_type": "modernbert", "norm_bias": False, "norm_eps": 1e-05, "num_attention_heads": 12,
    "num_hidden_layers": 22, "pad_token_id": 50283, "position_embedding_type": "absolute", "reference_compile": True,
    "sep_token_id": 50282, "sparse_pred_ignore_index": -100, "sparse_prediction": False, "torch_dtype": "float32",
    "transformers_version": "4.47.0.dev0", "vocab_size": 50368,
}


def modernbert_config(**overrides) -> ModernBertConfig:
    data = {**PUBLISHED_BASE, "num_hidden_layers": 4, "vocab_size": 512, "mask_token_id": 4, "pad_token_id": 0,
            "bos_token_id": 1, "cls_token_id": 1, "eos_token_id": 2, "sep_token_id": 2}
    data.update(overrides)
    return ModernBertConfig(**data)


def build(directory, model_class=ModernBertForMaskedLM, seed: int = 0, **overrides):
    """A random-weight transformers ModernBERT saved to ``directory`` (norm weights and biases
    randomised too, so parity sees every tensor); returns it in eval mode."""
    torch.manual_seed(seed)
    model = model_class(modernbert_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    return model


def mixed_batch(vocab: int, lengths, seed: int = 0, left: bool = False):
    """Token ids and an attention mask for rows of the given real lengths, padded to the longest."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(5, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        if left:
            mask[row, T - n:] = 1
        else:
            mask[row, :n] = 1
    ids[mask == 0] = 0
    ids[:, 0 if not left else -1] = 1
    return ids, mask


def assert_real_close(a, b, mask, tol=TOL):
    """Equal at every real position (and finite everywhere)."""
    assert torch.isfinite(a).all()
    assert max_abs_diff(a[mask.bool()], b[mask.bool()]) <= tol


# ---------------------------------------------------------------------------------------------- masked LM
@pytest.fixture(scope="module")
def base_shape(tmp_path_factory):
    """ModernBERT-base's shape (768 / 1,152 / 12 heads, window 128, mean pooling), 4 layers: full
    attention at 0 and 3, windowed at 1 and 2."""
    path = tmp_path_factory.mktemp("modernbert-base")
    hf = build(path)
    model = SGLangAutoModelForMaskedLM.from_pretrained(path, device="cpu")
    yield path, hf, model
    model.close()


def test_auto_class_picks_modernbert_and_published_config_fields(base_shape):
    path, hf, model = base_shape
    assert type(model).__name__ == "SGLangModernBertForMaskedLM"
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    assert model.config.rope_parameters["full_attention"]["rope_theta"] == 160000.0
    assert model.config.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0


def test_long_and_short_sequences_match_transformers(base_shape):
    """5- and 1,500-token rows in one batch: logits, loss and every hidden state at the real
    positions, and the padded positions too (transformers computes them; so does the engine)."""
    _, hf, model = base_shape
    ids, mask = mixed_batch(512, [1500, 5, 300])
    labels = ids.clone()
    labels[mask == 0] = -100
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    assert max_abs_diff(out.logits, ref.logits) <= TOL
    assert abs(out.loss.item() - ref.loss.item()) <= TOL
    assert len(out.hidden_states) == len(ref.hidden_states) == 5
    for a, b in zip(out.hidden_states, ref.hidden_states):
        assert max_abs_diff(a, b) <= TOL


def test_the_window_matters(base_shape):
    """The same 1,500 tokens through transformers with the window widened past the sequence give
    other answers: the parity above is a test of the window, not of full attention."""
    path, hf, model = base_shape
    ids, mask = mixed_batch(512, [1500], seed=3)
    wide = ModernBertForMaskedLM.from_pretrained(path, local_attention=4096).eval()
    with torch.no_grad():
        ref, ref_wide = hf(input_ids=ids).logits, wide(input_ids=ids).logits
    out = model(input_ids=ids, attention_mask=mask).logits
    assert max_abs_diff(out, ref) <= TOL
    assert max_abs_diff(ref_wide, ref) > 1e-3


def test_left_padding_and_mlm_logits_at_masks(base_shape):
    _, hf, model = base_shape
    ids, mask = mixed_batch(512, [200, 7, 60], seed=5, left=True)
    ids[0, 150], ids[2, -3] = 4, 4
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    out = model(input_ids=ids, attention_mask=mask).logits
    assert max_abs_diff(out, ref) <= TOL
    at_masks = model.compute_mlm_logits(ids, mask)
    assert max_abs_diff(at_masks, ref[ids == 4]) <= TOL
    words = model.compute_mlm_logits(ids, mask, vocab_ids=[7, 9, 11])
    assert max_abs_diff(words, ref[ids == 4][:, [7, 9, 11]]) <= TOL


def test_save_pretrained_loads_identically_in_transformers(base_shape, tmp_path):
    _, hf, model = base_shape
    model.save_pretrained(tmp_path)
    reloaded = ModernBertForMaskedLM.from_pretrained(tmp_path).eval()
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["ModernBertForMaskedLM"]
    theirs, ours = hf.state_dict(), reloaded.state_dict()
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert model.state_dict().keys() == {k for k in theirs if k != "decoder.weight"}


def test_fill_mask_pipeline_matches_transformers(tmp_path):
    from conftest import fill_mask_answers
    from transformers import AutoTokenizer, pipeline

    hf = build(tmp_path, vocab_size=50368, pad_token_id=1, mask_token_id=50264, bos_token_id=0, cls_token_id=0,
               eos_token_id=2, sep_token_id=2, num_hidden_layers=2, hidden_size=64, intermediate_size=96,
               num_attention_heads=4, local_attention=8)
    save_tokenizer_files(tmp_path)  # RoBERTa's BPE files: ModernBERT's tokenizer is a BPE of the same kind
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    texts = ["The capital of France is <mask>.", "A much longer sentence, so that the window of eight tokens "
             "cannot see the <mask> from the start of it, and more words after it."]
    with SGLangAutoModelForMaskedLM.from_pretrained(tmp_path, device="cpu") as model:
        ours = pipeline("fill-mask", model=model, tokenizer=tok)(texts, top_k=5)
    theirs = pipeline("fill-mask", model=hf, tokenizer=tok)(texts, top_k=5)
    assert fill_mask_answers(ours) == fill_mask_answers(theirs)


# ---------------------------------------------------------------------------------------------- odd shapes
ODD = dict(hidden_size=48, num_attention_heads=4, intermediate_size=100, local_attention=10, num_hidden_layers=3,
           attention_bias=True, mlp_bias=True, norm_bias=True, classifier_bias=True, decoder_bias=True,
           hidden_activation="gelu_pytorch_tanh", classifier_activation="silu", tie_word_embeddings=False,
           rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 50000.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}},
           layer_types=["sliding_attention", "full_attention", "sliding_attention"], max_position_embeddings=2048)


def test_odd_shapes_every_bias_untied(tmp_path):
    check_odd_shapes(tmp_path, tp_size=1)


def check_odd_shapes(tmp_path, tp_size: int):
    """An FFN SGLang pads (100 -> 128 per GeGLU half on CPU, 64 per rank at tp 2), a 5-token
    window, every bias, untied decoder, explicit layer_types and rope_parameters."""
    hf = build(tmp_path, **ODD)
    ids, mask = mixed_batch(512, [400, 5, 33], seed=7)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    with SGLangAutoModelForMaskedLM.from_pretrained(tmp_path, device="cpu", tp_size=tp_size) as model:
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        assert max_abs_diff(out.logits, ref.logits) <= TOL
        for a, b in zip(out.hidden_states, ref.hidden_states):
            assert max_abs_diff(a, b) <= TOL
        state = model.state_dict()
    theirs = hf.state_dict()
    assert state.keys() == theirs.keys()
    assert all(max_abs_diff(state[k], theirs[k]) == 0.0 for k in theirs)


def test_published_large_shape(tmp_path):
    """ModernBERT-large's shape (1,024 / 2,624 / 16 heads; 2 layers)."""
    hf = build(tmp_path, hidden_size=1024, intermediate_size=2624, num_attention_heads=16, num_hidden_layers=2)
    ids, mask = mixed_batch(512, [700, 5], seed=9)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    with SGLangAutoModelForMaskedLM.from_pretrained(tmp_path, device="cpu") as model:
        assert max_abs_diff(model(input_ids=ids, attention_mask=mask).logits, ref) <= TOL


def test_bfloat16_no_worse_than_transformers_bfloat16(tmp_path):
    hf = build(tmp_path, hidden_size=64, intermediate_size=96, num_attention_heads=4, local_attention=16)
    ids, mask = mixed_batch(512, [300, 5], seed=11)
    with torch.no_grad():
        exact = hf(input_ids=ids, attention_mask=mask).logits
        theirs = ModernBertForMaskedLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()(
            input_ids=ids, attention_mask=mask).logits
    with SGLangAutoModelForMaskedLM.from_pretrained(tmp_path, device="cpu", dtype=torch.bfloat16) as model:
        ours = model(input_ids=ids, attention_mask=mask).logits
    assert ours.dtype == torch.bfloat16
    real = mask.bool()
    err_ours = (ours.float() - exact)[real].abs().max().item()
    err_theirs = (theirs.float() - exact)[real].abs().max().item()
    assert err_ours <= 1.5 * err_theirs + 1e-3


def test_backend_attention_refused_with_windows_and_used_without(tmp_path):
    build(tmp_path / "windowed", hidden_size=32, intermediate_size=48, num_attention_heads=2, num_hidden_layers=2)
    with pytest.raises(ValueError, match="sliding window"):
        SGLangAutoModelForMaskedLM.from_pretrained(tmp_path / "windowed", device="cpu", encoder_attention="backend")
    hf = build(tmp_path / "global", hidden_size=32, intermediate_size=48, num_attention_heads=2, num_hidden_layers=2,
               global_attn_every_n_layers=1)
    ids, mask = mixed_batch(512, [40, 5], seed=13)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    with SGLangAutoModelForMaskedLM.from_pretrained(tmp_path / "global", device="cpu",
                                                    encoder_attention="backend") as model:
        assert model.runtime.config.encoder_attention == "backend"
        assert max_abs_diff(model(input_ids=ids, attention_mask=mask).logits, ref) <= TOL


# ---------------------------------------------------------------------------------------------- task heads
SMALL = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, local_attention=16, num_hidden_layers=3)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_sequence_classification(tmp_path, pooling):
    hf = build(tmp_path, ModernBertForSequenceClassification, classifier_pooling=pooling, num_labels=3, **SMALL)
    ids, mask = mixed_batch(512, [90, 5, 40], seed=17)
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    with SGLangAutoModelForSequenceClassification.from_pretrained(tmp_path, device="cpu") as model:
        assert type(model).__name__ == "SGLangModernBertForSequenceClassification"
        out = model(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
        assert max_abs_diff(out.logits, ref.logits) <= TOL
        assert abs(out.loss.item() - ref.loss.item()) <= TOL
        for a, b in zip(out.hidden_states, ref.hidden_states):
            assert max_abs_diff(a, b) <= TOL


def test_token_classification_and_question_answering(tmp_path):
    ids, mask = mixed_batch(512, [70, 5], seed=19)
    hf = build(tmp_path / "tok", ModernBertForTokenClassification, num_labels=5, **SMALL)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    with SGLangAutoModelForTokenClassification.from_pretrained(tmp_path / "tok", device="cpu") as model:
        assert max_abs_diff(model(input_ids=ids, attention_mask=mask).logits, ref) <= TOL
    hf = build(tmp_path / "qa", ModernBertForQuestionAnswering, **SMALL)
    start, end = torch.tensor([3, 1]), torch.tensor([9, 4])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, start_positions=start, end_positions=end)
    with SGLangAutoModelForQuestionAnswering.from_pretrained(tmp_path / "qa", device="cpu") as model:
        out = model(input_ids=ids, attention_mask=mask, start_positions=start, end_positions=end)
        assert max_abs_diff(out.start_logits, ref.start_logits) <= TOL
        assert max_abs_diff(out.end_logits, ref.end_logits) <= TOL
        assert abs(out.loss.item() - ref.loss.item()) <= TOL


def test_base_model_and_new_head_from_a_masked_lm_checkpoint(tmp_path):
    """The base model's last hidden state; a classifier started from a masked-LM checkpoint gets
    the MLM's prediction head and a new classifier initialised as transformers initialises it."""
    build(tmp_path, **SMALL)
    ids, mask = mixed_batch(512, [50, 5], seed=23)
    base = ModernBertModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    with SGLangAutoModel.from_pretrained(tmp_path, device="cpu") as model:
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        assert max_abs_diff(out.last_hidden_state, ref.last_hidden_state) <= TOL
        assert all(max_abs_diff(a, b) <= TOL for a, b in zip(out.hidden_states, ref.hidden_states))
    torch.manual_seed(5)
    theirs = ModernBertForSequenceClassification.from_pretrained(tmp_path, num_labels=4).eval()
    torch.manual_seed(5)
    model, info = SGLangAutoModelForSequenceClassification.from_pretrained(
        tmp_path, num_labels=4, device="cpu", output_loading_info=True)
    with model:
        assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]
        state = model.state_dict()
        for name in ("classifier.weight", "classifier.bias", "head.dense.weight", "head.norm.weight"):
            assert torch.equal(state[name], theirs.state_dict()[name]), name
        with torch.no_grad():
            expected = theirs(input_ids=ids, attention_mask=mask).logits
        assert max_abs_diff(model(input_ids=ids, attention_mask=mask).logits, expected) <= TOL


def test_token_types_refused_clearly(base_shape):
    from sglang_hf_bridge.errors import InputValidationError

    _, _, model = base_shape
    ids, mask = mixed_batch(512, [6], seed=1)
    with pytest.raises(InputValidationError, match="token type"):
        model(input_ids=ids, attention_mask=mask, token_type_ids=torch.ones_like(ids))
    assert model(input_ids=ids, attention_mask=mask).logits.shape == (1, 6, 512)  # still usable


# ---------------------------------------------------------------------------------------------- Hub ids, caches
def test_hub_id_from_a_local_cache_and_remote_code_refused(tmp_path):
    from test_hub_ids import COMMIT_A, add_to_hub_cache

    from sglang_hf_bridge.errors import CheckpointError

    hf = build(tmp_path / "src", **SMALL)
    add_to_hub_cache(tmp_path / "cache", "answerdotai/ModernBERT-tiny", tmp_path / "src", COMMIT_A)
    ids, mask = mixed_batch(512, [30, 5], seed=29)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    with SGLangAutoModelForMaskedLM.from_pretrained("answerdotai/ModernBERT-tiny", cache_dir=tmp_path / "cache",
                                                    local_files_only=True, device="cpu") as model:
        assert max_abs_diff(model(input_ids=ids, attention_mask=mask).logits, ref) <= TOL
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config["auto_map"] = {"AutoModelForMaskedLM": "modeling_evil.Model"}
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="auto_map"):
        SGLangAutoModelForMaskedLM.from_pretrained(tmp_path / "src", device="cpu")


def test_result_cache_is_exact_and_follows_weight_changes(base_shape):
    """The whole-sequence result cache serves the same bits, and an in-place weight change (as
    MeZO makes) is never served stale."""
    _, _, model = base_shape
    ids, mask = mixed_batch(512, [64, 5], seed=31)
    model.enable_result_cache(64)
    try:
        first = model(input_ids=ids, attention_mask=mask).logits
        again = model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(first, again)
        assert model.cache_stats()["result"]["hits"] >= 2
        embeddings = model.get_input_embeddings().weight
        with torch.no_grad():
            embeddings[ids[0, 3]] += 1.0
        try:
            changed = model(input_ids=ids, attention_mask=mask).logits
            assert max_abs_diff(changed, first) > 1e-4
        finally:
            with torch.no_grad():
                embeddings[ids[0, 3]] -= 1.0
    finally:
        model.disable_result_cache()


# ---------------------------------------------------------------------------------------------- MeZO
@pytest.mark.parametrize("mode", ["all", "head"])
def test_mezo_trains_a_classifier_as_the_reference_on_transformers(tmp_path, mode):
    check_mezo_classifier(tmp_path, mode, tp_size=1)


def check_mezo_classifier(tmp_path, mode: str, tp_size: int):
    """MeZOTrainer on a ModernBERT classifier equals Algorithm 1 run on transformers' classifier
    with the same seeds and directions (the fused Wqkv / Wi drawn whole, under their HF names);
    ``zo_trainable="head"`` trains the prediction head, the classifier and the final norm over
    the frozen-layer cache."""
    import copy
    import zlib

    import torch.nn.functional as F
    from test_mezo import EPS, LR, SEED, STEPS, WD, RecordingMeZOTrainer, z_of
    from transformers import default_data_collator

    from sglang_hf_bridge.engine import HEAD, base_layer_of
    from sglang_hf_bridge.training import MeZOTrainingArguments

    hf = build(tmp_path / "ckpt", ModernBertForSequenceClassification, num_labels=2, **SMALL)
    g = torch.Generator().manual_seed(37)
    rows = []
    for i in range(24):
        n = int(torch.randint(5, 40, (1,), generator=g))
        ids = torch.randint(5, 512, (40,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": (torch.arange(40) < n).long(), "labels": i % 2})
    args = MeZOTrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=STEPS,
                                 learning_rate=LR, weight_decay=WD, lr_scheduler_type="constant", zo_eps=EPS,
                                 seed=SEED, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
                                 **({"zo_trainable": "head"} if mode == "head" else {}))
    with SGLangAutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt", device="cpu",
                                                                  tp_size=tp_size) as model:
        trainer = RecordingMeZOTrainer(model=model, args=args, train_dataset=rows,
                                       data_collator=default_data_collator)
        trainer.train()
        ref_model = copy.deepcopy(hf)
        params = {n: p for n, p in ref_model.named_parameters() if mode == "all" or base_layer_of(n) == HEAD}
        if mode == "head":
            assert sorted(params) == ["classifier.bias", "classifier.weight", "head.dense.weight",
                                      "head.norm.weight", "model.final_norm.weight"]
        grads = []
        for step, batch in enumerate(trainer.seen):
            seed = zlib.crc32(f"{SEED}:{step}:0".encode())

            def loss():
                with torch.no_grad():
                    logits = ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                return float(F.cross_entropy(logits, batch["labels"]))

            with torch.no_grad():
                for n, p in params.items():
                    p.add_(EPS * z_of(seed, n, p.shape))
                l_plus = loss()
                for n, p in params.items():
                    p.add_(-2 * EPS * z_of(seed, n, p.shape))
                l_minus = loss()
                for n, p in params.items():
                    p.add_(EPS * z_of(seed, n, p.shape))
                grad = (l_plus - l_minus) / (2 * EPS)
                for n, p in params.items():
                    decay = 0.0 if n.endswith(("bias", "norm.weight")) else WD
                    p.sub_(LR * (grad * z_of(seed, n, p.shape) + decay * p))
            grads.append(grad)
        ours = [h["projected_grads"][0] for h in trainer.zo_history]
        for a, b in zip(ours, grads):
            assert abs(a - b) <= 1e-3 * max(1.0, abs(b)), (a, b)
        state = model.state_dict()
        assert max(max_abs_diff(state[n], p) for n, p in ref_model.named_parameters()) <= 1e-6
        assert max(max_abs_diff(state[n], p) for n, p in hf.named_parameters() if n in params) > 1e-5
        if mode == "head":
            assert model.cache_stats()["frozen_layer"] is not None


# ---------------------------------------------------------------------------------------------- LoRA
def _peft_state(peft_model):
    return {k.replace(".default", ""): v for k, v in peft_model.state_dict().items() if "lora_" in k}


def test_peft_adapters_per_row_fused_wqkv_and_geglu(tmp_path):
    check_peft_adapters_per_row(tmp_path, tp_size=1)


def check_peft_adapters_per_row(tmp_path, tp_size: int):
    """PEFT adapters trained on transformers' ModernBERT (``Wqkv``, both ``Wo``, ``Wi`` -- fused
    modules whose A is shared by their parts) run per row, padded rows included, at tp 1 and 2
    with an FFN SGLang pads; saved back, PEFT loads the same matrices."""
    import copy

    from peft import LoraConfig, PeftModel, get_peft_model

    hf = build(tmp_path / "ckpt", **{**SMALL, "intermediate_size": 100})
    adapters = {"all": LoraConfig(r=4, lora_alpha=8, target_modules=["Wqkv", "Wo", "Wi"], init_lora_weights=False),
                "attn-out": LoraConfig(r=2, lora_alpha=2, target_modules=r".*attn\.Wo", init_lora_weights=False)}
    peft_models = {}
    for seed, (name, config) in enumerate(adapters.items()):
        torch.manual_seed(seed)
        peft_models[name] = get_peft_model(copy.deepcopy(hf), config).eval()
        peft_models[name].save_pretrained(tmp_path / name)
    ids, mask = mixed_batch(512, [70, 6, 30, 12], seed=41)
    rows = ["all", "all", "attn-out", "__base__"]
    with torch.no_grad():
        expected = {n: m(input_ids=ids, attention_mask=mask).logits for n, m in peft_models.items()}
        expected["__base__"] = hf(input_ids=ids, attention_mask=mask).logits
    with SGLangAutoModelForMaskedLM.from_pretrained(tmp_path / "ckpt", device="cpu", tp_size=tp_size) as model:
        for name in adapters:
            model.load_adapter(tmp_path / name, adapter_name=name)
        out = model(input_ids=ids, attention_mask=mask, adapter_names=rows).logits
        for row, name in enumerate(rows):
            assert max_abs_diff(out[row], expected[name][row]) <= TOL, (row, name)
        assert max_abs_diff(expected["all"][1], expected["__base__"][1]) > 1e-3  # the adapter matters
        state = model.adapter_state_dict("all")
        ref = _peft_state(peft_models["all"])
        assert set(state) == set(ref) and all(torch.equal(state[k], ref[k]) for k in ref)
        assert {k.split(".layers.0.")[1] for k in state if ".layers.0." in k} == {
            "attn.Wqkv.lora_A.weight", "attn.Wqkv.lora_B.weight", "attn.Wo.lora_A.weight", "attn.Wo.lora_B.weight",
            "mlp.Wi.lora_A.weight", "mlp.Wi.lora_B.weight", "mlp.Wo.lora_A.weight", "mlp.Wo.lora_B.weight"}
        model.save_adapter(tmp_path / "saved", "attn-out")
    back = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "saved").eval()
    assert all(torch.equal(_peft_state(back)[k], v) for k, v in _peft_state(peft_models["attn-out"]).items())


def test_add_adapter_and_mezo_on_lora_match_peft(tmp_path):
    check_lora_mezo(tmp_path, tp_size=1)


def check_lora_mezo(tmp_path, tp_size: int):
    """``add_adapter`` initialises fused targets as PEFT does (same seed, same tensors), and
    MeZOTrainer moves a ModernBERT classifier's LoRA (fused Wqkv / Wi, z drawn whole under PEFT's
    names, every copy of the shared A moved together) and its own head exactly as it moves the
    PEFT model."""
    import copy

    from peft import LoraConfig, get_peft_model
    from test_mezo import EPS, LR, SEED, STEPS, WD, RecordingMeZOTrainer
    from transformers import default_data_collator

    from sglang_hf_bridge.training import MeZOTrainingArguments
    from sglang_hf_bridge.training.mezo import _peft_saved_name

    hf = build(tmp_path / "ckpt", ModernBertForSequenceClassification, num_labels=2, **SMALL)
    config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["Wqkv", "Wi", "Wo"])
    torch.manual_seed(3)
    peft_model = get_peft_model(copy.deepcopy(hf), config).eval()
    g = torch.Generator().manual_seed(43)
    rows = []
    for i in range(24):
        n = int(torch.randint(5, 40, (1,), generator=g))
        rows.append({"input_ids": torch.randint(5, 512, (40,), generator=g),
                     "attention_mask": (torch.arange(40) < n).long(), "labels": i % 2})

    def train(model, out):
        args = MeZOTrainingArguments(output_dir=str(out), per_device_train_batch_size=8, max_steps=STEPS,
                                     learning_rate=LR, weight_decay=WD, lr_scheduler_type="constant", zo_eps=EPS,
                                     seed=SEED, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
                                     zo_trainable="lora")
        trainer = RecordingMeZOTrainer(model=model, args=args, train_dataset=rows, data_collator=default_data_collator)
        trainer.train()
        return trainer

    with SGLangAutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt", device="cpu",
                                                                  tp_size=tp_size) as model:
        torch.manual_seed(3)
        model.add_adapter(config, "task")
        initial = model.adapter_state_dict("task")  # (adapter_tensors' views are tp_size=1's)
        for n, p in peft_model.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                assert torch.equal(initial[_peft_saved_name(n)], p), n
        ref = train(peft_model, tmp_path / "ref")
        ours = train(model, tmp_path / "ours")
        for a, b in zip(ours.zo_history, ref.zo_history):
            g_ours, g_ref = a["projected_grads"][0], b["projected_grads"][0]
            assert abs(g_ours - g_ref) <= 1e-3 * max(1.0, abs(g_ref))
        tensors = model.adapter_state_dict("task")
        expected = {_peft_saved_name(n): p for n, p in peft_model.named_parameters()
                    if "lora_" in n or "modules_to_save" in n}
        assert set(expected) == set(tensors)
        assert max(max_abs_diff(tensors[n], p) for n, p in expected.items()) <= 1e-6
        wqkv_a = "base_model.model.model.layers.1.attn.Wqkv.lora_A.weight"
        assert max_abs_diff(tensors[wqkv_a], initial[wqkv_a]) > 1e-6  # it trained
        ids, mask = mixed_batch(512, [30, 5], seed=47)
        with torch.no_grad():
            reference = peft_model(input_ids=ids, attention_mask=mask).logits
        assert max_abs_diff(model(input_ids=ids, attention_mask=mask).logits, reference) <= 1e-5


def test_sparse_prediction_as_transformers(tmp_path):
    """``sparse_prediction=True`` with labels: logits only at the labelled tokens, and the loss."""
    hf = build(tmp_path, sparse_prediction=True, **SMALL)
    ids, mask = mixed_batch(512, [40, 9], seed=53)
    labels = torch.full_like(ids, -100)
    labels[0, [3, 17, 30]] = ids[0, [3, 17, 30]]
    labels[1, 4] = ids[1, 4]
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
    assert ref.logits.shape == (4, 512)
    with SGLangAutoModelForMaskedLM.from_pretrained(tmp_path, device="cpu") as model:
        for hidden in (False, True):
            out = model(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=hidden)
            assert max_abs_diff(out.logits, ref.logits) <= TOL
            assert abs(out.loss.item() - ref.loss.item()) <= TOL
        full = model(input_ids=ids, attention_mask=mask)  # no labels: every position, as transformers
        assert full.logits.shape == (2, 40, 512)


def test_sentence_transformers_on_a_modernbert_backbone(tmp_path):
    """An embedding model built as ModernBERT embedders are published (ModernBertModel + mean
    pooling + normalisation): ``use_sglang_engine`` gives sentence-transformers' embeddings."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer

    from sglang_hf_bridge.integrations.sentence_transformers import use_sglang_engine

    build(tmp_path, ModernBertModel, vocab_size=50368, pad_token_id=1, mask_token_id=50264, bos_token_id=0,
          cls_token_id=0, eos_token_id=2, sep_token_id=2, **SMALL)
    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(tmp_path)  # with tokenizer.json, as published

    def embedder():
        return SentenceTransformer(modules=[models.Transformer(str(tmp_path)), models.Pooling(64, "mean"),
                                            models.Normalize()], device="cpu")

    texts = ["a short query", "a much longer document, " * 60, "and a third one"]
    theirs = embedder().encode(texts, convert_to_tensor=True)
    ours = use_sglang_engine(embedder())
    try:
        assert max_abs_diff(ours.encode(texts, convert_to_tensor=True), theirs) <= TOL
    finally:
        ours.close_engines()


def test_two_threads_get_their_own_rows(base_shape):
    """Two callers at once (one long document, one short batch) share engine passes and each gets
    exactly what it gets alone."""
    import threading

    _, _, model = base_shape
    inputs = [mixed_batch(512, [900], seed=71), mixed_batch(512, [12, 5, 30], seed=73)]
    alone = [model(input_ids=ids, attention_mask=mask).logits for ids, mask in inputs]
    results = [None, None]

    def call(i):
        ids, mask = inputs[i]
        results[i] = model(input_ids=ids, attention_mask=mask).logits

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(torch.equal(r, a) for r, a in zip(results, alone))
    from conftest import assert_pools_free

    assert_pools_free(model)
