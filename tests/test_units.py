"""Fast unit tests of the pure modules: no SGLang engine is started (no from_pretrained, no
ModelRunner). Everything here runs in milliseconds, except the import-arrow tests at the end,
which each start a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from sglang_hf_bridge import SequenceTooLongError, compat, errors
from sglang_hf_bridge.engine import versions
from sglang_hf_bridge.engine.frozen_cache import FrozenLayerIndex, FrozenStateStore, sequence_identity
from sglang_hf_bridge.engine.result_cache import ResultCache, result_nbytes
from sglang_hf_bridge.engine.scheduler import plan_chunks
from sglang_hf_bridge.engine.types import (
    EncoderCall,
    EncoderResult,
    EncoderSequence,
    FrozenPlan,
    QueryOnlySpec,
    SequenceResult,
)
from sglang_hf_bridge.engine.versions import (
    EMBEDDINGS,
    HEAD,
    AdapterWrite,
    BaseWrite,
    WeightVersions,
    apply_effect,
    base_layer_of,
    writes,
)
from sglang_hf_bridge.lora import names as lora_names
from sglang_hf_bridge.process import qualified_name, resolve_qualified_name
from sglang_hf_bridge.sglang_models import weight_map as wm

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "sglang_hf_bridge"


# ============================================================================ weight_map
@pytest.mark.parametrize("prefix", ["", "roberta.", "camembert.", "xlm_roberta."])
def test_checkpoint_to_engine_name_strips_every_base_prefix(prefix):
    expected = ("embeddings.layer_norm.weight", None)
    assert wm.ROBERTA.checkpoint_to_engine_name(f"{prefix}embeddings.LayerNorm.weight") == expected
    expected = ("layers.7.mlp.down_proj.bias", None)
    assert wm.ROBERTA.checkpoint_to_engine_name(f"{prefix}encoder.layer.7.output.dense.bias") == expected
    assert wm.ROBERTA.checkpoint_to_engine_name(f"{prefix}encoder.layer.2.attention.output.LayerNorm.weight") == (
        "layers.2.attn_norm.weight", None)


@pytest.mark.parametrize("hf, shard", [("query", "q"), ("key", "k"), ("value", "v")])
def test_checkpoint_to_engine_name_qkv_shard_ids(hf, shard):
    assert wm.ROBERTA.checkpoint_to_engine_name(f"roberta.encoder.layer.3.attention.self.{hf}.weight") == (
        "layers.3.self_attn.qkv_proj.weight", shard)
    assert wm.ROBERTA.checkpoint_to_engine_name(f"encoder.layer.10.attention.self.{hf}.bias") == (
        "layers.10.self_attn.qkv_proj.bias", shard)


def test_checkpoint_to_engine_name_lm_head_and_untied_decoder():
    assert wm.ROBERTA.checkpoint_to_engine_name("lm_head.bias") == ("lm_head.bias", None)
    assert wm.ROBERTA.checkpoint_to_engine_name("lm_head.decoder.bias") == ("lm_head.bias", None)
    assert wm.ROBERTA.checkpoint_to_engine_name("lm_head.decoder.weight") == ("lm_head.decoder.weight", None)
    assert wm.ROBERTA.checkpoint_to_engine_name("lm_head.layer_norm.weight") == ("lm_head.layer_norm.weight", None)


@pytest.mark.parametrize("name", [
    "roberta.embeddings.position_ids", "embeddings.position_ids", "camembert.embeddings.position_ids",
    "roberta.pooler.dense.weight", "pooler.dense.bias", "xlm_roberta.pooler.dense.bias",
])
def test_checkpoint_to_engine_name_ignored_names_return_none(name):
    assert wm.ROBERTA.checkpoint_to_engine_name(name) is None


@pytest.mark.parametrize("name", [
    "classifier.dense.weight", "roberta.encoder.layer.0.attention.self.foo.weight",
    "roberta.embeddings.position_ids.extra", "roberta.encoder.layer.x.output.dense.bias", "lm_head.decoder",
])
def test_checkpoint_to_engine_name_unknown_names_raise(name):
    with pytest.raises(KeyError):
        wm.ROBERTA.checkpoint_to_engine_name(name)


@pytest.mark.parametrize("layer", [0, 11])
def test_engine_to_checkpoint_names_inverts_every_table_row(layer):
    assert len(wm.ROBERTA.rows) >= 20
    for ckpt, engine, shard in wm.ROBERTA.rows:
        ckpt_name, engine_name = ckpt.format(i=layer), engine.format(i=layer)
        assert wm.ROBERTA.checkpoint_to_engine_name(ckpt_name) == (engine_name, shard)
        assert wm.ROBERTA.checkpoint_to_engine_name(wm.ROBERTA.to_hf_name(ckpt_name)) == (engine_name, shard)
        assert (ckpt_name, shard) in wm.ROBERTA.engine_to_checkpoint_names(engine_name)


def test_engine_to_checkpoint_names_fused_and_shared_targets():
    assert wm.ROBERTA.engine_to_checkpoint_names("layers.5.self_attn.qkv_proj.weight") == (
        ("encoder.layer.5.attention.self.query.weight", "q"),
        ("encoder.layer.5.attention.self.key.weight", "k"),
        ("encoder.layer.5.attention.self.value.weight", "v"),
    )
    expected = {("lm_head.bias", None), ("lm_head.decoder.bias", None)}
    assert set(wm.ROBERTA.engine_to_checkpoint_names("lm_head.bias")) == expected
    assert wm.ROBERTA.engine_to_checkpoint_names("layers.5.no_such.weight") == ()


def test_to_hf_name():
    assert wm.ROBERTA.to_hf_name("embeddings.LayerNorm.weight") == "roberta.embeddings.LayerNorm.weight"
    assert wm.ROBERTA.to_hf_name("encoder.layer.1.output.dense.bias") == "roberta.encoder.layer.1.output.dense.bias"
    assert wm.ROBERTA.to_hf_name("lm_head.dense.weight") == "lm_head.dense.weight"


# ============================================================================ versions
def test_bump_base_layers_and_all():
    v = WeightVersions()
    assert v.base_version() == 0 and v.clock == 0
    v.bump_base([2, 5])
    assert v.base_version() == 1
    assert v.base_version(below=2) == 0
    assert v.base_version(below=3) == 1
    v.bump_base([EMBEDDINGS])
    assert v.base_version(below=0) == 2
    v.bump_base(None)
    assert v.clock == 3
    assert v.base_version(below=0) == 3 and v.base_version() == 3


def test_base_version_below_only_moves_for_lower_layers():
    v = WeightVersions()
    v.bump_base([0])
    before = v.base_version(below=4)
    v.bump_base([4, HEAD])
    assert v.base_version(below=4) == before
    assert v.base_version() > before
    v.bump_base([3])
    assert v.base_version(below=4) > before


def test_adapter_version_and_bump_everything():
    v = WeightVersions()
    assert v.adapter_version("a", 7) == (0, 7)
    v.bump_adapter("a")
    assert v.adapter_version("a", 7) == (1, 7)
    assert v.adapter_version("b", 0) == (0, 0)
    assert v.base_version() == 0  # an adapter change leaves the base alone
    v.bump_everything()
    assert v.adapter_version("b", 0) == (v.clock, 0)
    assert v.adapter_version("a", 3) == (v.clock, 3)
    assert v.base_version(below=0) == v.clock


@pytest.mark.parametrize("name, layer", [
    ("roberta.embeddings.word_embeddings.weight", EMBEDDINGS),
    ("embeddings.layer_norm.bias", EMBEDDINGS),
    ("roberta.encoder.layer.3.attention.self.query.weight", 3),
    ("encoder.layer.11.output.dense.bias", 11),
    ("layers.7.mlp.fc_in.weight", 7),
    ("lm_head.dense.weight", HEAD),
    ("lm_head.bias", HEAD),
])
def test_base_layer_of(name, layer):
    assert base_layer_of(name) == layer


def test_min_layer_of():
    assert versions.min_layer_of(["lm_head.bias", "roberta.encoder.layer.4.output.dense.bias"]) == 4
    assert versions.min_layer_of([]) is None
    assert HEAD > 1000


def test_apply_effect_base_names_bump_their_layer_only():
    v = WeightVersions()

    @writes(lambda names: BaseWrite(names))
    def op(engine, names):
        pass

    apply_effect(v, op, (["roberta.encoder.layer.3.attention.self.query.weight",
                          "roberta.encoder.layer.3.output.dense.bias"],))
    assert v.base_version() == 1
    assert v.base_version(below=3) == 0
    assert v.adapter_version("x", 0) == (0, 0)


def test_apply_effect_adapter_and_nothing_and_undeclared():
    v = WeightVersions()

    @writes(lambda lora_id: AdapterWrite(lora_id))
    def load(engine, lora_id):
        pass

    @writes(None)
    def read(engine):
        pass

    def undeclared(engine):
        pass

    apply_effect(v, load, ("a",))
    assert v.adapter_version("a", 0) == (1, 0) and v.base_version() == 0
    apply_effect(v, read, ())
    assert v.clock == 1 and v.base_version() == 0 and v.adapter_version("b", 0) == (0, 0)
    apply_effect(v, undeclared, ())
    assert v.base_version(below=0) == 2 and v.adapter_version("b", 0) == (2, 0)

    @writes(lambda: ("base", None))  # the old string form: refused, not read as "everything"
    def stringly(engine):
        pass

    with pytest.raises(TypeError, match="BaseWrite or AdapterWrite"):
        apply_effect(v, stringly, ())


# ============================================================================ result_cache
def _result(fill: float, rows: int = 2, dtype=torch.float32) -> SequenceResult:
    return SequenceResult(logits=torch.full((rows, 3), fill, dtype=dtype))  # rows * 3 * itemsize bytes


def test_result_nbytes_counts_every_tensor():
    r = SequenceResult(
        logits=torch.zeros(2, 3), last_hidden=torch.zeros(2, 4, dtype=torch.float16),
        query_only_logits=torch.zeros(1, 3), query_only_last_hidden=torch.zeros(1, 4),
        hidden_states=[torch.zeros(2, 4)] * 3, query_only_hidden_states=[torch.zeros(1, 4)],
    )
    assert result_nbytes(r) == 24 + 16 + 12 + 16 + 96 + 16
    assert result_nbytes(SequenceResult()) == 0


def test_result_cache_hit_and_version_mismatch():
    cache = ResultCache(max_bytes=1000)
    original = _result(1.0)
    cache.put("k", (1, 0), original)
    got = cache.get("k", (1, 0))
    assert got is not None and torch.equal(got.logits, original.logits)
    original.logits.fill_(5.0)  # the cache holds its own copy
    assert torch.equal(cache.get("k", (1, 0)).logits, torch.ones(2, 3))
    assert cache.get("k", (2, 0)) is None  # other weights: a miss, and the entry is dropped
    assert cache.get("k", (1, 0)) is None
    assert cache.get("other", (1, 0)) is None
    s = cache.stats
    assert (s.hits, s.misses, s.entries, s.bytes) == (2, 3, 0, 0)


def test_result_cache_lru_eviction_by_bytes():
    cache = ResultCache(max_bytes=60)  # two 24-byte results fit, three do not
    cache.put("a", 0, _result(1.0))
    cache.put("b", 0, _result(2.0))
    assert cache.get("a", 0) is not None  # a is now the most recently used
    cache.put("c", 0, _result(3.0))
    assert cache.get("b", 0) is None
    assert torch.equal(cache.get("a", 0).logits, torch.ones(2, 3))
    assert torch.equal(cache.get("c", 0).logits, torch.full((2, 3), 3.0))
    assert cache.stats.as_dict() == {"hits": 3, "misses": 1, "evictions": 1, "bytes": 48, "entries": 2,
                                     "max_bytes": 60}


def test_result_cache_replace_too_large_and_clear():
    cache = ResultCache(max_bytes=50)
    cache.put("a", 0, _result(1.0))
    cache.put("a", 1, _result(2.0))  # replacing a key is not an eviction
    assert cache.stats.evictions == 0 and cache.stats.bytes == 24 and cache.stats.entries == 1
    assert torch.equal(cache.get("a", 1).logits, torch.full((2, 3), 2.0))
    cache.put("big", 0, _result(1.0, rows=3))  # 36 bytes fits alone -> evicts a
    assert cache.stats.evictions == 1 and cache.get("a", 1) is None
    cache.put("huge", 0, _result(1.0, rows=10))  # 120 bytes > max: not stored, nothing evicted
    assert cache.get("huge", 0) is None and cache.get("big", 0) is not None
    cache.clear()
    assert cache.stats.bytes == 0 and cache.stats.entries == 0 and cache.get("big", 0) is None


# ============================================================================ frozen_cache
def _seq(ids, lora_id=None, query_only=None):
    return EncoderSequence(input_ids=list(ids), position_ids=[i + 2 for i in range(len(ids))],
                           lora_id=lora_id, query_only=query_only, logit_positions=[0])


def _no_adapter(lora_id):
    return None


def test_sequence_identity_ignores_what_is_asked():
    a, b = _seq([5, 6]), _seq([5, 6])
    b.logit_positions = [1]
    assert sequence_identity(a) == sequence_identity(b)
    assert sequence_identity(a) != sequence_identity(_seq([5, 7]))
    assert sequence_identity(a) != sequence_identity(_seq([5, 6], query_only=[QueryOnlySpec(1, 4)]))


def test_frozen_index_first_call_computes_all_then_none():
    index = FrozenLayerIndex(layer=2, max_bytes=1000, bytes_per_token=4)
    call = EncoderCall(sequences=[_seq([1, 2, 3]), _seq([4, 5])])
    first = index.plan(call, base_version=0, adapter_part=_no_adapter)
    assert first.layer == 2 and first.compute == [0, 1] and first.evict == []
    assert first.keys[0] == (2, sequence_identity(call.sequences[0]), None)
    assert index.stats.bytes == 20 and index.stats.entries == 2 and index.stats.misses == 2
    second = index.plan(call, base_version=0, adapter_part=_no_adapter)
    assert second.compute == [] and second.evict == [] and second.keys == first.keys
    assert index.stats.hits == 2 and index.stats.bytes == 20


def test_frozen_index_duplicates_in_one_call_computed_once():
    index = FrozenLayerIndex(layer=1, max_bytes=1000, bytes_per_token=1)
    call = EncoderCall(sequences=[_seq([1, 2]), _seq([3]), _seq([1, 2])])
    plan = index.plan(call, 0, _no_adapter)
    assert plan.compute == [0, 1]
    assert plan.keys[0] == plan.keys[2]
    assert index.stats.entries == 2 and index.stats.bytes == 3


def test_frozen_index_adapter_part_in_key():
    index = FrozenLayerIndex(layer=1, max_bytes=1000, bytes_per_token=1)
    call = EncoderCall(sequences=[_seq([1, 2], lora_id="a"), _seq([1, 2], lora_id="b")])
    plan = index.plan(call, 0, lambda lora_id: (lora_id, 0))
    assert plan.compute == [0, 1] and plan.keys[0] != plan.keys[1]


def test_frozen_index_base_version_change_evicts_everything():
    index = FrozenLayerIndex(layer=1, max_bytes=1000, bytes_per_token=1)
    call = EncoderCall(sequences=[_seq([1, 2]), _seq([3])])
    first = index.plan(call, 0, _no_adapter)
    after = index.plan(call, 1, _no_adapter)
    assert sorted(after.evict) == sorted(first.keys)
    assert after.compute == [0, 1]
    assert index.stats.bytes == 3 and index.stats.entries == 2


def test_frozen_index_lru_eviction_and_bypass():
    index = FrozenLayerIndex(layer=1, max_bytes=40, bytes_per_token=4)  # room for 10 tokens
    a, b, c = _seq([1] * 5), _seq([2] * 5), _seq([3] * 5)
    key_a = index.plan(EncoderCall(sequences=[a]), 0, _no_adapter).keys[0]
    key_b = index.plan(EncoderCall(sequences=[b]), 0, _no_adapter).keys[0]
    index.plan(EncoderCall(sequences=[a]), 0, _no_adapter)  # a is now the most recently used
    plan = index.plan(EncoderCall(sequences=[c]), 0, _no_adapter)
    assert plan.compute == [0] and plan.evict == [key_b]
    assert index.stats.evictions == 1 and index.stats.bytes == 40
    again = index.plan(EncoderCall(sequences=[a]), 0, _no_adapter)
    assert again.compute == [] and key_a in again.keys
    too_big = index.plan(EncoderCall(sequences=[_seq([4] * 11)]), 0, _no_adapter)
    assert too_big.layer is None and too_big.compute == [] and index.bypassed_calls == 1
    assert index.stats.bytes == 40  # a bypassed call leaves the entries alone


def test_frozen_index_stats_after_base_change_on_a_bypassed_call():
    """A base-version change empties the index even when the call itself is bypassed; the stats
    must say so (entries used to stay at the old count: the bypass path returned before
    ``stats.entries`` was updated)."""
    index = FrozenLayerIndex(layer=1, max_bytes=10, bytes_per_token=1)
    first = index.plan(EncoderCall(sequences=[_seq([1, 2]), _seq([3])]), 0, _no_adapter)
    plan = index.plan(EncoderCall(sequences=[_seq([4] * 11)]), 1, _no_adapter)
    assert plan.layer is None and sorted(plan.evict) == sorted(first.keys)
    assert index.stats.bytes == 0
    assert index.stats.entries == 0


def test_frozen_index_clear_returns_keys():
    index = FrozenLayerIndex(layer=1, max_bytes=1000, bytes_per_token=1)
    plan = index.plan(EncoderCall(sequences=[_seq([1]), _seq([2])]), 0, _no_adapter)
    assert sorted(index.clear()) == sorted(plan.keys)
    assert index.stats.bytes == 0 and index.stats.entries == 0
    assert index.clear() == []
    assert index.plan(EncoderCall(sequences=[_seq([1])]), 0, _no_adapter).compute == [0]


class _FakeRun:
    """The uncached forward: prefix calls return last_hidden = sum(ids) per token, H=2."""

    def __init__(self):
        self.calls = []

    def __call__(self, call):
        self.calls.append(call)
        out = []
        for s in call.sequences:
            h = torch.full((len(s.input_ids), 2), float(sum(s.input_ids)))
            qo = torch.full((len(s.query_only), 2), -1.0) if s.query_only else None
            out.append(SequenceResult(last_hidden=h, query_only_last_hidden=qo))
        return EncoderResult(sequences=out)


def test_frozen_store_computes_prefix_then_runs_from_layer():
    index, store, run = FrozenLayerIndex(3, 1000, 1), FrozenStateStore(), _FakeRun()
    seqs = [_seq([1, 2]), _seq([5], query_only=[QueryOnlySpec(7, 3)])]
    call = EncoderCall(sequences=seqs, logits="all")
    call.frozen = index.plan(call, 0, _no_adapter)
    store.apply(call, run)
    assert len(run.calls) == 2
    prefix, main = run.calls
    assert prefix.stop_layer == 3 and prefix.logits == "none" and prefix.return_last_hidden
    assert all(s.logit_positions is None for s in prefix.sequences)
    assert main.start_layer == 3 and main.frozen is None and main.logits == "all"
    assert torch.equal(main.sequences[0].initial_hidden, torch.full((2, 2), 3.0))
    assert main.sequences[0].query_only_initial is None
    assert torch.equal(main.sequences[1].query_only_initial, torch.full((1, 2), -1.0))
    assert main.sequences[0].logit_positions == [0]
    assert len(store.tensors) == 2
    assert seqs[0].initial_hidden is None  # the caller's sequences are not modified

    # A repeated call: no prefix run, the stored states are reused.
    call2 = EncoderCall(sequences=[_seq([1, 2])])
    call2.frozen = index.plan(call2, 0, _no_adapter)
    store.apply(call2, run)
    assert len(run.calls) == 3 and run.calls[2].start_layer == 3
    assert torch.equal(run.calls[2].sequences[0].initial_hidden, torch.full((2, 2), 3.0))


def test_frozen_store_evicts_and_runs_bypassed_calls_plainly():
    store, run = FrozenStateStore(), _FakeRun()
    store.tensors["old"] = (torch.zeros(1, 2), None)
    call = EncoderCall(sequences=[_seq([1])], frozen=FrozenPlan(layer=None, keys=["k"], compute=[], evict=["old"]))
    store.apply(call, run)
    assert "old" not in store.tensors and store.tensors == {}
    assert len(run.calls) == 1 and run.calls[0].frozen is None and run.calls[0].start_layer == 0
    assert run.calls[0].sequences[0].initial_hidden is None


def test_frozen_store_missing_entry_raises():
    store = FrozenStateStore()
    call = EncoderCall(sequences=[_seq([1])], frozen=FrozenPlan(layer=2, keys=["k"], compute=[], evict=[]))
    with pytest.raises(RuntimeError, match="missing"):
        store.apply(call, _FakeRun())


# ============================================================================ scheduler
def test_plan_chunks_budget_and_rows():
    assert plan_chunks([3, 3, 3, 1], token_budget=6, max_rows=8) == [[0, 1], [2, 3]]
    assert plan_chunks([1, 1, 1, 1, 1], token_budget=100, max_rows=2) == [[0, 1], [2, 3], [4]]
    assert plan_chunks([6, 1, 5], token_budget=6, max_rows=8) == [[0], [1, 2]]
    assert plan_chunks([], token_budget=6, max_rows=2) == []


def test_plan_chunks_preserves_order():
    lengths = [2, 5, 1, 4, 3, 1, 1]
    chunks = plan_chunks(lengths, token_budget=6, max_rows=3)
    assert [i for c in chunks for i in c] == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in c) <= 6 and len(c) <= 3 for c in chunks)
    assert chunks == [[0], [1, 2], [3], [4, 5, 6]]


def test_plan_chunks_errors():
    with pytest.raises(SequenceTooLongError, match="sequence 1 has 7 tokens"):
        plan_chunks([2, 7], token_budget=6, max_rows=4)
    with pytest.raises(RuntimeError):
        plan_chunks([1], token_budget=0, max_rows=4)
    with pytest.raises(RuntimeError):
        plan_chunks([1], token_budget=4, max_rows=0)


# ============================================================================ lora names
@pytest.mark.parametrize("key", [
    "base_model.model.roberta.encoder.layer.3.attention.self.query.lora_A.weight",
    "roberta.encoder.layer.3.attention.self.query.lora_A.weight",
    "base_model.model.roberta.encoder.layer.3.attention.self.query.lora_A.default.weight",
    "base_model.model.camembert.encoder.layer.3.attention.self.query.lora_A.weight",
    "xlm_roberta.encoder.layer.3.attention.self.query.lora_A.my_adapter.weight",
])
def test_peft_key_to_engine_prefix_forms(key):
    assert lora_names.peft_key_to_engine(key) == (3, "q_proj", "A")


def test_peft_key_to_engine_modules_and_b():
    assert lora_names.peft_key_to_engine(
        "base_model.model.roberta.encoder.layer.11.output.dense.lora_B.weight") == (11, "down_proj", "B")
    assert lora_names.peft_key_to_engine(
        "base_model.model.roberta.encoder.layer.0.attention.output.dense.lora_B.default.weight") == (0, "o_proj", "B")
    assert lora_names.peft_key_to_engine(
        "base_model.model.roberta.encoder.layer.2.intermediate.dense.lora_A.weight") == (2, "fc_in", "A")


@pytest.mark.parametrize("module", sorted(wm.LORA_MODULES))
@pytest.mark.parametrize("which", ["A", "B"])
def test_engine_key_to_peft_round_trip(module, which):
    key = lora_names.engine_key_to_peft(5, module, which)
    assert key.startswith("base_model.model.roberta.encoder.layer.5.") and key.endswith(f".lora_{which}.weight")
    assert lora_names.peft_key_to_engine(key) == (5, module, which)


@pytest.mark.parametrize("key", [
    "base_model.model.roberta.encoder.layer.0.attention.self.query.weight",
    "base_model.model.roberta.encoder.layer.0.attention.self.query.base_layer.weight",
    "base_model.model.roberta.encoder.layer.0.attention.output.LayerNorm.lora_A.weight",
    "base_model.model.lm_head.dense.lora_A.weight",
    "base_model.model.classifier.dense.lora_B.weight",
    "base_model.model.roberta.embeddings.word_embeddings.lora_embedding_A",
])
def test_peft_key_to_engine_rejects_non_lora_keys(key):
    with pytest.raises(KeyError):
        lora_names.peft_key_to_engine(key)


def test_hf_module_to_engine():
    assert lora_names.hf_module_to_engine("roberta.encoder.layer.4.attention.self.value") == (4, "v_proj")
    assert lora_names.hf_module_to_engine("roberta.encoder.layer.4.attention.output.LayerNorm") is None
    assert lora_names.hf_module_to_engine("lm_head.dense") is None


# ============================================================================ compat accessors
def test_require_names_missing_attribute():
    with pytest.raises(compat.SGLangLayoutError, match=r"SimpleNamespace\.prefix_len"):
        compat._require(types.SimpleNamespace(), "prefix_len", "the prefix")
    assert compat._require(types.SimpleNamespace(x=3), "x", "x") == 3


def test_request_prefix_len():
    with pytest.raises(compat.SGLangLayoutError, match="prefix_len"):
        compat.request_prefix_len(types.SimpleNamespace())
    assert compat.request_prefix_len(types.SimpleNamespace(prefix_len=4)) == 4


def test_lora_layer_buffers():
    with pytest.raises(compat.SGLangLayoutError, match="A_buffer_qkv"):
        compat.lora_layer_buffers(types.SimpleNamespace(A_buffer="a", B_buffer="b"), fused_qkv=True)
    with pytest.raises(compat.SGLangLayoutError, match=r"\.B_buffer\b"):
        compat.lora_layer_buffers(types.SimpleNamespace(A_buffer="a"), fused_qkv=False)
    assert compat.lora_layer_buffers(types.SimpleNamespace(A_buffer="a", B_buffer="b"), False) == ("a", "b")
    assert compat.lora_layer_buffers(types.SimpleNamespace(A_buffer_qkv="qa", B_buffer_qkv="qb"), True) == ("qa", "qb")


def test_lora_pool_buffers():
    with pytest.raises(compat.SGLangLayoutError, match="memory_pool"):
        compat.lora_pool_buffers(types.SimpleNamespace())
    with pytest.raises(compat.SGLangLayoutError, match="B_buffer"):
        compat.lora_pool_buffers(types.SimpleNamespace(memory_pool=types.SimpleNamespace(A_buffer={})))
    pool = types.SimpleNamespace(A_buffer={"q": 1}, B_buffer={"q": 2})
    assert compat.lora_pool_buffers(types.SimpleNamespace(memory_pool=pool)) == ({"q": 1}, {"q": 2})


def test_tensor_version_and_lora_base_layer():
    with pytest.raises(compat.SGLangLayoutError, match="_version"):
        compat.tensor_version(types.SimpleNamespace())
    t = torch.zeros(2)
    before = compat.tensor_version(t)
    t[:1].add_(1.0)  # an in-place edit through a view moves the shared counter
    assert compat.tensor_version(t) == before + 1
    from sglang.srt.lora.layers import BaseLayerWithLoRA

    plain = torch.nn.Linear(2, 2)
    assert compat.lora_base_layer(plain) is plain  # not wrapped (LoRA off): the layer itself
    assert compat.lora_base_layer(BaseLayerWithLoRA(plain, lora_backend=None)) is plain


# ============================================================================ process / workers
def test_qualified_name_round_trip():
    from sglang_hf_bridge.engine.rank_ops import rank_forward

    path = qualified_name(rank_forward)
    assert path == "sglang_hf_bridge.engine.rank_ops.rank_forward"
    assert resolve_qualified_name(path) is rank_forward


@pytest.mark.parametrize("path", ["sglang_hf_bridge.no_such_module.fn", "sglang_hf_bridge.process.no_such_fn",
                                  "no_dots"])
def test_resolve_bogus_qualified_name_raises_import_error(path):
    with pytest.raises(ImportError, match="cannot resolve"):
        resolve_qualified_name(path)


def test_run_call_refuses_foreign_paths():
    from sglang_hf_bridge.engine.tp_worker import _run_call

    with pytest.raises(ValueError, match="only run sglang_hf_bridge"):
        _run_call(object(), "os.system", ("true",), True)
    with pytest.raises(ValueError, match="only run sglang_hf_bridge"):
        _run_call(object(), "sglang_hf_bridge_evil.op", (), True)


def test_run_call_refuses_undeclared_functions():
    from sglang_hf_bridge.engine.tp_worker import _run_call

    with pytest.raises(ValueError, match="not a declared rank operation"):
        _run_call(object(), "sglang_hf_bridge.process.free_local_port", (), True)


def test_run_call_runs_declared_operation():
    from sglang_hf_bridge.engine.tp_worker import _run_call

    sentinel, seen = object(), []

    class FakeEngine:
        def forward(self, call):
            seen.append(call)
            return sentinel

        def after_operation(self, fn, args):  # what drops a rank's packed weight copies after writes
            seen.append(("after", fn.__name__))

    path = "sglang_hf_bridge.engine.rank_ops.rank_forward"
    assert _run_call(FakeEngine(), path, ("the-call",), True) is sentinel
    assert _run_call(FakeEngine(), path, ("second",), False) is None
    assert seen == ["the-call", ("after", "rank_forward"), "second", ("after", "rank_forward")]


# ============================================================================ import arrows
def _modules_after(code: str) -> set:
    script = textwrap.dedent(code) + "\nimport sys\nprint('\\n'.join(sorted(sys.modules)))\n"
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       cwd=str(PACKAGE_DIR.parent))
    assert r.returncode == 0, r.stderr
    mods = set(r.stdout.split())
    assert any(m.startswith("sglang_hf_bridge") for m in mods)
    return mods


def _top_level(mods: set, *names: str) -> list:
    return sorted(m for m in mods if m.split(".")[0] in names)


def test_import_package_is_cheap():
    mods = _modules_after("import sglang_hf_bridge")
    assert _top_level(mods, "sglang", "peft", "transformers") == []


def test_import_model_class_imports_neither_sglang_nor_peft():
    mods = _modules_after("from sglang_hf_bridge import SGLangRobertaForMaskedLM")
    assert "sglang_hf_bridge.modeling.roberta" in mods
    assert _top_level(mods, "sglang", "peft") == []


@pytest.mark.parametrize("module", ["sglang_hf_bridge.engine", "sglang_hf_bridge.engine.workers",
                                    "sglang_hf_bridge.engine.rank"])
def test_engine_imports_neither_modeling_nor_training(module):
    mods = _modules_after(f"import {module}")
    assert module in mods
    assert sorted(m for m in mods if m.startswith(("sglang_hf_bridge.modeling", "sglang_hf_bridge.training"))) == []


def _absolute_imports(path: Path, package: str):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:  # ``from .. import modeling``
                yield node.lineno, f"{module}.{alias.name}"


def test_engine_sources_never_import_modeling_or_training():
    files = sorted((PACKAGE_DIR / "engine").glob("*.py"))
    assert len(files) >= 10
    forbidden = ("sglang_hf_bridge.modeling", "sglang_hf_bridge.training")
    bad = []
    for f in files:
        for lineno, module in _absolute_imports(f, "sglang_hf_bridge.engine"):
            if module == forbidden[0] or module == forbidden[1] or module.startswith(tuple(p + "." for p in forbidden)):
                bad.append(f"{f.name}:{lineno}: {module}")
    assert bad == []
    # the resolver itself sees relative imports as they are meant
    imports = _absolute_imports(PACKAGE_DIR / "engine" / "workers.py", "sglang_hf_bridge.engine")
    resolved = dict((m, n) for n, m in imports)
    assert "sglang_hf_bridge.process" in resolved and "sglang_hf_bridge.engine.config" in resolved


# --- errors: one module, one base class ----------------------------------------------------------
_CAUGHT_BUILTINS = (ValueError, RuntimeError, OSError, TypeError)


@pytest.mark.parametrize("name", errors.__all__)
def test_every_error_subclasses_the_base_and_a_builtin(name):
    import sglang_hf_bridge

    cls = getattr(errors, name)
    assert getattr(sglang_hf_bridge, name) is cls  # exported by the package
    assert issubclass(cls, errors.SGLangBridgeError) and issubclass(cls, Exception)
    if cls is not errors.SGLangBridgeError:
        assert issubclass(cls, _CAUGHT_BUILTINS), f"{name} subclasses no builtin a caller catches"


def test_old_error_import_paths_are_the_same_objects():
    from sglang_hf_bridge import training
    from sglang_hf_bridge.training import distributed

    assert compat.SGLangLayoutError is errors.SGLangLayoutError
    assert distributed.DataParallelError is errors.DataParallelError is training.DataParallelError
    assert issubclass(errors.SGLangLayoutError, RuntimeError) and issubclass(errors.DataParallelError, RuntimeError)
    assert issubclass(errors.EngineClosedError, RuntimeError)  # pytest.raises(RuntimeError) still catches it


def test_the_rank_limit_is_one_class_caught_as_either_old_one():
    assert issubclass(errors.AdapterRankError, errors.UnsupportedAdapterError)
    assert issubclass(errors.AdapterRankError, errors.AdapterError)
    assert issubclass(errors.AdapterRankError, ValueError)


def test_a_model_without_an_engine_raises_engine_closed_error():
    from sglang_hf_bridge.modeling.base import SGLangPreTrainedModel

    stub = types.SimpleNamespace(_runtime=None)
    with pytest.raises(errors.EngineClosedError, match="has no running engine"):
        SGLangPreTrainedModel.runtime.fget(stub)
