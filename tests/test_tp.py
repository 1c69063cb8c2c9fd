"""tp_size=2: SGLang's TP groups over two processes (gloo on CPU) give tp_size=1's answers."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_forward_matches_hf, build_checkpoint, fill_mask_answers, max_abs_diff
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForMaskedLM, pipeline

from sglang_hf_bridge import SGLangRobertaForMaskedLM
from sglang_hf_bridge.engine import gemm

TOL = 1e-5
TEXTS = ["The movie was <mask>.", "A longer sentence about a <mask> film that I <mask> watched.", "<mask>"]


@pytest.fixture(scope="module")
def tp_pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp-ckpt")
    hf = build_checkpoint(path, "roberta", seed=21)
    # The packed GEMM path where this torch has it: its copies must follow writes on every rank.
    path_kind = gemm.PACKED if gemm.PACKED in gemm.available_paths("cpu", "float32") else "auto"
    model = SGLangRobertaForMaskedLM.from_pretrained(path, tp_size=2, gemm=path_kind)
    yield path, hf, model
    model.close()


def test_forward_loss_hidden_states_match_hf(tp_pair, tokenizer):
    _, hf, model = tp_pair
    for side in ("right", "left"):
        tokenizer.padding_side = side
        enc = dict(tokenizer(TEXTS, return_tensors="pt", padding=True))
        tokenizer.padding_side = "right"
        ref = assert_forward_matches_hf(model, hf, enc, TOL)
        label_ids = [372, 6587]
        cm = model.compute_mlm_logits(enc["input_ids"], enc["attention_mask"], vocab_ids=label_ids)
        assert max_abs_diff(cm, ref.logits[enc["input_ids"] == tokenizer.mask_token_id][:, label_ids]) <= TOL
    assert model.engine_pool_stats() == model.engine_pool_capacity()


def test_packed_copies_follow_weight_writes_on_every_rank(tp_pair):
    """Each rank packs its own shards; a write (MeZO's) must drop the workers' copies too, or the
    shards they hold answer from the old weights."""
    from sglang_hf_bridge.engine import rank_perturb_weights, rank_set_hf_tensors

    _, hf, model = tp_pair
    names = ["roberta.encoder.layer.0.intermediate.dense.weight", "roberta.encoder.layer.1.output.dense.weight",
             "roberta.encoder.layer.1.attention.self.key.weight"]
    ids = torch.tensor([[0, 5, 6, 7, 8, 2], [0, 9, 10, 2, 1, 1]])
    enc = {"input_ids": ids, "attention_mask": (ids != 1).long()}
    for _ in range(2):
        model(**enc)  # copies on every rank
    model.runtime.collective_rpc(rank_perturb_weights, names, 3, 0.05)
    try:
        moved = type(hf)(hf.config).eval()
        moved.load_state_dict(model.state_dict(), strict=False)
        with torch.no_grad():
            ref = moved(**enc).logits
            assert max_abs_diff(ref, hf(**enc).logits) > 1e-3
            for _ in range(2):
                assert max_abs_diff(model(**enc).logits, ref) <= TOL
    finally:  # the weights back bit for bit (a perturbation undone by another is not)
        model.runtime.collective_rpc(rank_set_hf_tensors, {n: hf.state_dict()[n] for n in names})


def test_fill_mask_pipeline(tp_pair, tokenizer):
    _, hf, model = tp_pair
    a = pipeline("fill-mask", model=model, tokenizer=tokenizer)(TEXTS, top_k=5, batch_size=2)
    b = pipeline("fill-mask", model=hf, tokenizer=tokenizer)(TEXTS, top_k=5, batch_size=2)
    assert fill_mask_answers(a) == fill_mask_answers(b)


def test_save_pretrained_writes_full_unsharded_checkpoint(tp_pair, tmp_path):
    _, hf, model = tp_pair
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[0, 5, 6, 7, 2]])
    with torch.no_grad():
        assert max_abs_diff(reloaded(ids).logits, hf(ids).logits) == 0.0


def test_adapters_mixed_batch_and_save(tp_pair, tmp_path):
    _, hf, model = tp_pair
    ids = torch.tensor([[0, 5, 6, 7, 8, 2], [0, 9, 10, 2, 1, 1], [0, 11, 2, 1, 1, 1]])
    mask = (ids != 1).long()
    peft = {}
    for i, (name, targets) in enumerate([("a", ["query", "value", "attention.output.dense"]),
                                         ("b", ["key", "intermediate.dense", "output.dense"])]):
        torch.manual_seed(i)
        peft[name] = get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                  init_lora_weights=False)).eval()
        peft[name].save_pretrained(tmp_path / name)
        model.load_adapter(tmp_path / name, adapter_name=name)
    try:
        with torch.no_grad():
            out = model(ids, attention_mask=mask, adapter_names=["a", "b", "__base__"]).logits
            refs = [peft["a"](ids, attention_mask=mask).logits[0], peft["b"](ids, attention_mask=mask).logits[1],
                    hf(ids, attention_mask=mask).logits[2]]
        for row, ref in enumerate(refs):
            assert max_abs_diff(out[row], ref) <= TOL
        model.save_pretrained(tmp_path / "saved", adapter_name="b")
        back = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "saved").eval()
        with torch.no_grad():
            assert max_abs_diff(back(ids).logits, peft["b"](ids).logits) == 0.0
        with pytest.raises(NotImplementedError, match="tp_size > 1"):
            model.adapter_tensors("a")
    finally:
        model.delete_adapter(["a", "b"])


def test_tp_size_must_divide_before_any_process_starts(tp_pair):
    path, _, _ = tp_pair
    with pytest.raises(ValueError, match="tp_size=3 does not divide num_attention_heads=4"):
        SGLangRobertaForMaskedLM.from_pretrained(path, tp_size=3)


def test_second_engine_next_to_tp_engine_is_refused(tp_pair):
    path, _, model = tp_pair
    with pytest.raises(RuntimeError, match="holds the parallel runtime"):
        SGLangRobertaForMaskedLM.from_pretrained(path)
    assert model(torch.tensor([[0, 5, 2]])).logits.shape == (1, 3, 50265)


def test_mezo_trajectory_equals_tp1_and_reference(tp_pair, tokenizer, tmp_path):
    """Last in this module: it trains the shared tp=2 model. z is drawn per HF/PEFT name at full
    shape and sliced per rank, so the trajectory does not depend on tp_size."""
    from conftest import sst2_train_rows
    from test_mezo import EPS, LR, SEED, WD, RecordingMeZOTrainer, reference_mezo  # noqa: F401

    from sglang_hf_bridge.training import (
        MeZOTrainingArguments,
        PromptClassifier,
        PromptCollator,
        PromptTemplate,
    )

    _, hf, model = tp_pair
    rows = sst2_train_rows(16)
    template = PromptTemplate()
    label_ids = template.label_word_ids(tokenizer)
    torch.manual_seed(3)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "output.dense"], init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(hf), lora).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    for mode in ("lora", "all"):
        if mode == "lora":
            model.load_adapter(tmp_path / "adapter", adapter_name="task")
        args = MeZOTrainingArguments(output_dir=str(tmp_path / mode), per_device_train_batch_size=8, max_steps=2,
                                     learning_rate=LR, weight_decay=WD, lr_scheduler_type="constant", zo_eps=EPS,
                                     seed=SEED, report_to=[], save_strategy="no", use_cpu=True,
                                     remove_unused_columns=False, zo_trainable=mode)
        trainer = RecordingMeZOTrainer(model=PromptClassifier(model, label_ids, tokenizer.mask_token_id), args=args,
                                       train_dataset=rows, data_collator=PromptCollator(tokenizer, template))
        trainer.train()
        if mode == "lora":
            params = {n.replace(".default", ""): p for n, p in peft_model.named_parameters() if "lora_" in n}
            reference_mezo(peft_model, params, trainer.seen, label_ids, tokenizer.mask_token_id)
            ours = model.adapter_state_dict("task")
            assert max(max_abs_diff(ours[n], p) for n, p in params.items()) <= 1e-6
            assert sorted(model.peft_config) == ["task"]  # train() gave its scratch adapters back
            model.delete_adapter("task")
        else:
            ref_model = copy.deepcopy(hf)
            reference_mezo(ref_model, dict(ref_model.named_parameters()), trainer.seen, label_ids,
                           tokenizer.mask_token_id)
            model.save_pretrained(tmp_path / "saved")
            saved = AutoModelForMaskedLM.from_pretrained(tmp_path / "saved")
            ref_params = dict(ref_model.named_parameters())
            assert max(max_abs_diff(p, ref_params[n]) for n, p in saved.named_parameters()) <= 1e-6


def test_caches_under_tensor_parallelism(tp_pair, tokenizer):
    """The front decides hits and evictions once; every rank keeps the same frozen-layer states."""
    from sglang_hf_bridge.training.zo import EngineWeightsTarget

    _, _, model = tp_pair
    enc = dict(tokenizer(TEXTS, return_tensors="pt", padding=True))
    ref = model(**enc).logits  # uncached (earlier tests trained this model: HF's weights are not its own)
    model.enable_result_cache(16)
    model.enable_frozen_layer_cache(1)
    try:
        first, second = model(**enc).logits, model(**enc).logits
        assert torch.equal(first, second) and max_abs_diff(first, ref) <= 1e-6
        stats = model.cache_stats()
        assert stats["result"]["hits"] == 3 and stats["frozen_layer"]["misses"] == 3
        for layer in (1, 0):  # above the frozen layer (entries kept), then below it (entries dropped)
            top = EngineWeightsTarget(model, lambda n: f".layer.{layer}." in n)
            top.perturb(5, 0.05)
            changed = model(**enc).logits
            model.clear_caches()
            assert max_abs_diff(changed, model(**enc).logits) <= 1e-6 and max_abs_diff(changed, ref) > 1e-4
            top.perturb(5, -0.05)
        assert max_abs_diff(model(**enc).logits, ref) <= 1e-5
        assert model.engine_pool_stats() == model.engine_pool_capacity()
    finally:
        model.disable_result_cache()
        model.disable_frozen_layer_cache()


def test_ctrl_c_in_rank0_leaves_no_worker_mid_collective(tp_pair, tokenizer):
    """Ctrl-C (a real SIGINT) landing while rank 0 runs a TP forward: it is raised once every rank
    is done, so the next calls are right and no worker is left inside a collective."""
    import signal
    import threading
    import time

    _, _, model = tp_pair  # earlier tests trained it: its own uninterrupted answer is the oracle
    enc = dict(tokenizer(TEXTS * 8, return_tensors="pt", padding=True))
    expected = model(**enc).logits.detach()
    state = {"armed": False, "interrupted": 0}

    def on_sigint(signum, frame):  # Ctrl-C's behaviour, only inside the armed region below
        if state["armed"]:
            raise KeyboardInterrupt

    def send():
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        for delay in (0.0, 0.01, 0.05, 0.1, 0.2):
            timer = threading.Timer(delay, send)
            state["armed"] = True
            try:
                timer.start()
                model(**enc)
                timer.join()
                time.sleep(0.05)
            except KeyboardInterrupt:
                state["interrupted"] += 1
            finally:
                state["armed"] = False
                timer.join()
            assert max_abs_diff(model(**enc).logits, expected) <= TOL
            assert model.engine_pool_stats() == model.engine_pool_capacity()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert state["interrupted"] >= 3
