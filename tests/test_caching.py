"""Caches that are valid for a bidirectional encoder: weight versions, the whole-sequence result
cache and the frozen-layer activation cache -- never stale, never a prefix, same answers."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_pools_free, build_checkpoint, max_abs_diff
from peft import LoraConfig, get_peft_model

from sglang_hf_bridge import SGLangRobertaForMaskedLM
from sglang_hf_bridge.training.zo import EngineAdapterTarget, EngineWeightsTarget

LAYERS, FROZEN = 4, 2
EXACT = 1e-6  # caches on vs off; see sglang_hf_bridge/engine/caching.py for why not always bitwise
IDS = torch.tensor([[0, 5, 6, 7, 8, 9, 2], [0, 10, 11, 2, 1, 1, 1], [0, 12, 13, 14, 2, 1, 1], [0, 15, 2, 1, 1, 1, 1]])
MASK = (IDS != 1).long()
TOP = dict(r=4, lora_alpha=8, target_modules=["query", "value"], layers_to_transform=[2, 3])
LOW = dict(r=4, lora_alpha=8, target_modules=["query", "value", "intermediate.dense"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache-ckpt")
    hf = build_checkpoint(path, "roberta", seed=41, num_hidden_layers=LAYERS)
    other = tmp_path_factory.mktemp("cache-ckpt-other")
    build_checkpoint(other, "roberta", seed=42, num_hidden_layers=LAYERS)
    adapters = {}
    for name, config, seed in (("top", TOP, 1), ("low", LOW, 2), ("top2", TOP, 3)):
        torch.manual_seed(seed)
        peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(init_lora_weights=False, **config)).eval()
        adapters[name] = tmp_path_factory.mktemp(f"adapter-{name}")
        peft_model.save_pretrained(adapters[name])
    return path, hf, other, adapters


@pytest.fixture
def model(checkpoint):
    path, _, _, adapters = checkpoint
    m = SGLangRobertaForMaskedLM.from_pretrained(path)
    m.load_adapter(adapters["top"], adapter_name="top")
    m.load_adapter(adapters["low"], adapter_name="low")
    m.enable_result_cache(64)
    m.enable_frozen_layer_cache(FROZEN, 64)
    yield m
    m.close()


def run(m):
    return m(IDS, attention_mask=MASK, adapter_names=["__base__", "top", "low", "top"]).logits


def uncached(m):
    m.clear_caches()
    return run(m)


# ---- 1. versioned weights: every mutation path --------------------------------------------------
def _edit_view(m, _):
    next(iter(m.adapter_tensors("low").values())).add_(0.5)  # a user's in-place edit of a view


MUTATIONS = {
    "adapter view edited in place": _edit_view,
    "mezo perturb adapter": lambda m, _: EngineAdapterTarget(m, "low").perturb(7, 0.05),
    "mezo update adapter": lambda m, _: EngineAdapterTarget(m, "top").update(7, 1.0, 5.0, 0.0),
    "mezo perturb all weights": lambda m, _: EngineWeightsTarget(m).perturb(7, 0.01),
    "mezo update all weights": lambda m, _: EngineWeightsTarget(m).update(7, 1.0, 0.01, 0.1),
    "perturb layer 0 only": lambda m, _: EngineWeightsTarget(m, lambda n: ".layer.0." in n).perturb(7, 0.05),
    "perturb top layer only": lambda m, _: EngineWeightsTarget(m, lambda n: ".layer.3." in n).perturb(7, 0.05),
    "copy adapter into another": lambda m, _: EngineAdapterTarget(m, "top").copy_into("low"),
    "resume base weights from checkpoint": lambda m, ck: EngineWeightsTarget(m).load_checkpoint(ck[2]),
    "resume adapter from checkpoint": lambda m, ck: EngineAdapterTarget(m, "top").load_checkpoint(ck[3]["top2"]),
    "delete and reload adapter under the same name": lambda m, ck: (
        m.delete_adapter("top"), m.load_adapter(ck[3]["top2"], adapter_name="top")),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_no_stale_entry_after(model, checkpoint, mutation):
    before = run(model)
    assert torch.equal(run(model), before)  # served from the caches
    assert model.cache_stats()["result"]["hits"] == 4
    version = model.weights_version
    MUTATIONS[mutation](model, checkpoint)
    assert model.weights_version > version
    after = run(model)
    fresh = uncached(model)
    assert max_abs_diff(after, fresh) <= EXACT
    assert max_abs_diff(fresh, before) > 1e-4  # the mutation changed the answer: a stale hit would show
    assert_pools_free(model)


def test_frozen_entries_survive_changes_above_and_die_below(model):
    model.disable_result_cache()
    rows, names = IDS[[0, 1, 1, 2]], ["__base__", "top", "__base__", "low"]

    def go():
        return model(rows, attention_mask=(rows != 1).long(), adapter_names=names).logits

    go()
    frozen = model.cache_stats()["frozen_layer"]
    # "top" changes nothing below L: row 1 with "top" and without share one entry; "low" does not
    assert frozen["misses"] == 3 and frozen["hits"] == 1
    EngineWeightsTarget(model, lambda n: ".layer.3." in n).perturb(1, 0.05)
    EngineAdapterTarget(model, "top").perturb(1, 0.05)
    EngineAdapterTarget(model, "low").perturb(1, 0.05)
    out = go()
    stats = model.cache_stats()["frozen_layer"]
    assert stats["hits"] == frozen["hits"] + 3 and stats["misses"] == frozen["misses"] + 1  # only "low" again
    EngineWeightsTarget(model, lambda n: ".layer.1." in n).perturb(1, 0.05)
    go()
    assert model.cache_stats()["frozen_layer"]["misses"] == stats["misses"] + 3
    EngineWeightsTarget(model, lambda n: ".layer.1." in n).perturb(1, -0.05)
    assert max_abs_diff(go(), out) <= EXACT
    model.disable_frozen_layer_cache()
    assert max_abs_diff(go(), out) <= EXACT


@pytest.mark.parametrize("switch", ["set_adapter", "disable_adapters"])
def test_selecting_adapters_is_never_served_stale(model, switch):
    model.set_adapter("top")
    before = model(IDS, attention_mask=MASK).logits
    if switch == "set_adapter":
        model.set_adapter("low")
    else:
        model.disable_adapters()
    after = model(IDS, attention_mask=MASK).logits
    fresh = model.clear_caches() or model(IDS, attention_mask=MASK).logits
    assert max_abs_diff(after, fresh) <= EXACT and max_abs_diff(before, fresh) > 1e-4


# ---- 2./4. exactness against caches off and against transformers ---------------------------------
def test_forward_and_mlm_logits_equal_uncached_and_hf(model, checkpoint):
    _, hf, _, _ = checkpoint
    model.set_adapter("top")
    model.disable_adapters()
    with torch.no_grad():
        ref = hf(IDS, attention_mask=MASK, output_hidden_states=True)
    for _ in range(2):  # first call fills the caches, second is served from them
        out = model(IDS, attention_mask=MASK)
        assert max_abs_diff(out.logits, ref.logits) <= 1e-5
        mlm = model.compute_mlm_logits(IDS, MASK, positions=MASK.bool(), vocab_ids=[5, 6, 7])
        assert max_abs_diff(mlm, ref.logits[MASK.bool()][:, [5, 6, 7]]) <= 1e-5
    cached_logits, cached_mlm = out.logits, mlm
    model.disable_result_cache()
    model.disable_frozen_layer_cache()
    plain = model(IDS, attention_mask=MASK).logits
    assert max_abs_diff(cached_logits, plain) <= EXACT
    fresh = model.compute_mlm_logits(IDS, MASK, positions=MASK.bool(), vocab_ids=[5, 6, 7])
    assert max_abs_diff(cached_mlm, fresh) <= EXACT
    # hidden states of every layer are not taken from the frozen cache, and still right
    model.enable_frozen_layer_cache(FROZEN)
    hs = model(IDS, attention_mask=MASK, output_hidden_states=True).hidden_states
    assert all(max_abs_diff(a, b) <= 1e-5 for a, b in zip(hs, ref.hidden_states))


def test_mixed_adapter_batch_equals_uncached(model):
    names = ["top", "__base__", "low", "top", "low", "__base__"]
    ids, mask = torch.cat([IDS, IDS[:2]]), torch.cat([MASK, MASK[:2]])
    first = model(ids, attention_mask=mask, adapter_names=names).logits
    second = model(ids, attention_mask=mask, adapter_names=names).logits
    model.disable_result_cache()
    model.disable_frozen_layer_cache()
    plain = model(ids, attention_mask=mask, adapter_names=names).logits
    assert torch.equal(first, second)
    assert max_abs_diff(first, plain) <= EXACT


def test_duplicate_rows_in_a_batch_are_computed_once(model):
    ids, mask = torch.cat([IDS, IDS, IDS[:1]]), torch.cat([MASK, MASK, MASK[:1]])
    out = model.compute_mlm_logits(ids, mask, positions=mask.bool(), vocab_ids=[5, 6])
    stats = model.cache_stats()["result"]
    assert stats["misses"] == 4 and stats["hits"] == 5 and stats["entries"] == 4
    n = int(MASK.sum())
    assert torch.equal(out[:n], out[n : 2 * n])
    model.disable_result_cache()
    model.disable_frozen_layer_cache()
    assert max_abs_diff(out, model.compute_mlm_logits(ids, mask, positions=mask.bool(), vocab_ids=[5, 6])) <= EXACT


def test_shared_prefix_is_never_served(model, checkpoint):
    _, hf, _, _ = checkpoint
    model.disable_adapters()
    torch.manual_seed(0)
    long = torch.randint(3, 1000, (1, 60))
    model(long)  # cached: the whole 60-token sequence
    for cut in (59, 40):  # same first tokens, different sequence (shorter, or a different tail)
        other = torch.cat([long[:, :cut], torch.randint(3, 1000, (1, 60 - cut))], dim=1)
        for ids in (long[:, :cut], other):
            before = model.cache_stats()
            out = model(ids).logits
            after = model.cache_stats()
            assert after["result"]["misses"] == before["result"]["misses"] + 1
            assert after["frozen_layer"]["misses"] == before["frozen_layer"]["misses"] + 1
            with torch.no_grad():
                assert max_abs_diff(out, hf(ids).logits) <= 1e-5


def test_memory_bounds_lru_and_bypass(model):
    model.disable_adapters()
    model.enable_result_cache(max_mb=3)  # about two rows of logits ([n, 50265] fp32)
    model.enable_frozen_layer_cache(FROZEN, max_mb=6 * 64 * 4 / 2**20)  # room for 6 tokens of states
    outs = [model(IDS[i : i + 1], attention_mask=MASK[i : i + 1]).logits for i in range(4)]
    stats = model.cache_stats()
    assert stats["result"]["evictions"] >= 1 and stats["result"]["bytes"] <= stats["result"]["max_bytes"]
    assert stats["frozen_layer"]["bytes"] <= stats["frozen_layer"]["max_bytes"]
    assert stats["frozen_layer"]["bypassed_calls"] >= 1  # a 7-token row does not fit at all
    model.disable_result_cache()
    model.disable_frozen_layer_cache()
    for i, o in enumerate(outs):
        assert max_abs_diff(o, model(IDS[i : i + 1], attention_mask=MASK[i : i + 1]).logits) <= EXACT
    assert_pools_free(model)


def test_bad_cache_settings_are_refused(model):
    for bad in (0, LAYERS, -1, 1.5):
        with pytest.raises(ValueError, match="from_layer"):
            model.enable_frozen_layer_cache(bad)
    with pytest.raises(ValueError, match="max_mb"):
        model.enable_result_cache(0)
    with pytest.raises(ValueError, match="result_cache_mb"):
        SGLangRobertaForMaskedLM.from_pretrained("/nonexistent", result_cache_mb=-1)
    assert max_abs_diff(run(model), uncached(model)) <= EXACT  # still usable


def test_a_failed_call_leaves_the_caches_consistent(model, monkeypatch):
    """The front counts new frozen entries before the ranks compute them: a call that fails in
    between must not leave entries the ranks never stored (fault injected around the engine)."""
    from sglang_hf_bridge import InputValidationError

    engine = model.runtime.local  # rank 0's RankEngine
    real = engine.forward_engine

    def failing(call):
        if call.stop_layer:  # the pass that computes the states entering the frozen layer
            raise RuntimeError("injected failure")
        return real(call)

    monkeypatch.setattr(engine, "forward_engine", failing)
    with pytest.raises(RuntimeError, match="injected"):
        run(model)
    monkeypatch.undo()
    with pytest.raises(InputValidationError):
        model(torch.full((1, 3), 10**6), attention_mask=torch.ones(1, 3, dtype=torch.long))
    served = run(model)
    assert max_abs_diff(served, uncached(model)) <= EXACT
    assert_pools_free(model)


def test_caches_off_by_default(checkpoint):
    with SGLangRobertaForMaskedLM.from_pretrained(checkpoint[0], enable_lora=False) as m:
        assert m.cache_stats() == {"result": None, "frozen_layer": None}
        m(IDS, attention_mask=MASK)
    with SGLangRobertaForMaskedLM.from_pretrained(checkpoint[0], enable_lora=False, result_cache_mb=8) as m:
        m(IDS, attention_mask=MASK)
        assert m.cache_stats()["result"]["entries"] == 4


# ---- MeZO with the frozen-layer cache: the same trajectory ----------------------------------------
@pytest.mark.parametrize("mode", ["lora-paired", "lora-sequential", "top-layers"])
def test_mezo_trajectory_is_the_same_with_the_frozen_layer_cache(checkpoint, tokenizer, tmp_path, mode):
    from conftest import sst2_train_rows

    from sglang_hf_bridge.engine.weights import hf_parameter_slices
    from sglang_hf_bridge.training import (
        MeZOTrainer,
        MeZOTrainingArguments,
        PromptClassifier,
        PromptCollator,
        PromptTemplate,
    )

    path, _, _, adapters = checkpoint
    rows = sst2_train_rows(16)
    template = PromptTemplate()
    finals, stats = {}, {}
    for cache in (True, False):
        with SGLangRobertaForMaskedLM.from_pretrained(path, enable_lora=mode != "top-layers") as m:
            if mode != "top-layers":
                m.load_adapter(adapters["top"], adapter_name="task")
            args = MeZOTrainingArguments(
                output_dir=str(tmp_path / str(cache)), per_device_train_batch_size=8, num_train_epochs=2,
                learning_rate=1e-3 if mode != "top-layers" else 1e-4, lr_scheduler_type="constant", zo_eps=1e-3,
                seed=3, report_to=[], save_strategy="no", use_cpu=True, remove_unused_columns=False,
                zo_paired_batch=mode == "lora-paired", zo_top_layers=2 if mode == "top-layers" else 0,
                zo_frozen_layer_cache=cache)
            clf = PromptClassifier(m, template.label_word_ids(tokenizer), tokenizer.mask_token_id)
            collator = PromptCollator(tokenizer, template)
            MeZOTrainer(model=clf, args=args, train_dataset=rows, data_collator=collator).train()
            stats[cache] = m.cache_stats()["frozen_layer"]
            if mode == "top-layers":
                finals[cache] = {n: s.view.clone() for n, s in hf_parameter_slices(m.runtime.model).items()}
            else:
                finals[cache] = m.adapter_state_dict("task")
    assert stats[False] is None
    assert stats[True]["layer"] == 2 and stats[True]["misses"] == 16  # the 16 examples, once each
    assert stats[True]["hits"] >= 16 * 3 - 16  # every later pass over an example is a hit
    assert max(max_abs_diff(finals[True][n], finals[False][n]) for n in finals[False]) <= EXACT
