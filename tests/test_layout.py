"""ParameterLayout alone (no engine): at tp 1, 2 and 4, with an FFN and a vocabulary SGLang pads,
every layout gathers what a simulated SGLang sharding scattered, places each rank's view where
it sits in the HF tensor, pads for the loader, and refuses shapes its padding rules do not
predict. The simulation below is written from SGLang 0.5.23's behaviour, independently of the
layout code; the engine tests (test_tensor_parallel.py) check the same against the real thing."""

from __future__ import annotations

import types

import pytest
import torch

from sglang_hf_bridge.errors import SGLangLayoutError
from sglang_hf_bridge.sglang_models.layout import (
    ParameterLayout,
    build_layouts,
    lora_layout,
    module_dims,
    padded_intermediate_size,
    padded_vocab_size,
    tp_size_problems,
)
from sglang_hf_bridge.sglang_models.weight_map import LORA_MODULES, LORA_TARGETS, MODERNBERT, ROBERTA

H, FFN, VOCAB, HEADS = 8, 40, 100, 4  # FFN and VOCAB are padded on CPU at every tp size below


def engine_config(tp: int):
    return types.SimpleNamespace(hidden_size=H, intermediate_size=padded_intermediate_size(FFN, tp, "cpu"),
                                 original_intermediate_size=FFN, vocab_size=VOCAB, num_attention_heads=HEADS)


def hf_tensors(seed: int = 0):
    """HF-shaped tensors for layer 0 and the vocabulary, by engine name (q/k/v separate)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    return {
        "layers.0.self_attn.qkv_proj.weight": {p: r(H, H) for p in "qkv"},
        "layers.0.self_attn.qkv_proj.bias": {p: r(H) for p in "qkv"},
        "layers.0.self_attn.o_proj.weight": r(H, H),
        "layers.0.self_attn.o_proj.bias": r(H),
        "layers.0.mlp.fc_in.weight": r(FFN, H),
        "layers.0.mlp.fc_in.bias": r(FFN),
        "layers.0.mlp.down_proj.weight": r(H, FFN),
        "layers.0.attn_norm.weight": r(H),
        "embeddings.word_embeddings.weight": r(VOCAB, H),
        "lm_head.bias": r(VOCAB),
    }


def _pad(t, dim, size):
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim)


def sglang_shards(tensors, tp: int):
    """What each rank holds, as SGLang 0.5.23 shards on CPU: q/k/v per rank stacked [q_r; k_r; v_r];
    column-parallel rows / row-parallel columns in equal blocks; FFN padded to a multiple of
    32 * tp and the vocabulary to a multiple of 64, padding at the end of the whole."""
    ffn, vocab = padded_intermediate_size(FFN, tp, "cpu"), padded_vocab_size(VOCAB)
    rules = {"o_proj.weight": (1, H), "fc_in.weight": (0, ffn), "fc_in.bias": (0, ffn),
             "down_proj.weight": (1, ffn), "word_embeddings.weight": (0, vocab), "lm_head.bias": (0, vocab)}
    out = [{} for _ in range(tp)]
    for name, value in tensors.items():
        if isinstance(value, dict):  # fused q/k/v
            for r in range(tp):
                out[r][name] = torch.cat([value[p].chunk(tp, 0)[r] for p in "qkv"])
            continue
        rule = next((rule for suffix, rule in rules.items() if name.endswith(suffix)), None)
        if rule is None:
            for r in range(tp):
                out[r][name] = value
            continue
        dim, size = rule
        for r, piece in enumerate(_pad(value, dim, size).chunk(tp, dim)):
            out[r][name] = piece
    return out


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_layouts_gather_place_and_pad_every_parameter(tp):
    tensors = hf_tensors()
    shards = sglang_shards(tensors, tp)
    layouts = build_layouts(engine_config(tp), tp, {n: t.shape for n, t in shards[0].items()})
    for name, value in tensors.items():
        layout = layouts[name]
        per_rank = [s[name] for s in shards]
        whole = torch.cat([value[p] for p in "qkv"]) if isinstance(value, dict) else value
        assert torch.equal(layout.gather(per_rank), whole), name
        for part in ("q", "k", "v") if isinstance(value, dict) else (None,):
            hf = value[part] if part else value
            assert layout.full_shape(per_rank[0].shape) == tuple(hf.shape), name
            assert torch.equal(layout.part_of(whole, part), hf)
            covered = torch.zeros(hf.shape, dtype=torch.bool)
            for r in range(tp):
                view = layout.local(per_rank[r], r, part)
                index = layout.index(r, view.dim())
                assert torch.equal(hf[index], view), (name, r)
                covered[index] = True
            assert covered.all(), f"{name}: the ranks' views do not cover the HF tensor"
        if not layout.replicated:  # what the loader hands SGLang splits back into the shards
            padded = torch.cat([value[p] for p in "qkv"]) if isinstance(value, dict) else value
            if layout.loader_pads:
                assert torch.equal(torch.cat(per_rank, layout.split_dim), layout.padded_for_loading(padded))
            else:
                assert layout.padded_for_loading(padded) is padded


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_views_are_live_memory(tp):
    shards = sglang_shards(hf_tensors(), tp)
    layouts = build_layouts(engine_config(tp), tp, {n: t.shape for n, t in shards[0].items()})
    name = "layers.0.mlp.down_proj.weight"
    view = layouts[name].local(shards[0][name], 0)
    view.add_(1.0)
    assert torch.equal(shards[0][name].narrow(1, 0, view.shape[1]), view)


def test_padding_counts_at_tp_4():
    shards = sglang_shards(hf_tensors(), 4)
    layouts = build_layouts(engine_config(4), 4, {n: t.shape for n, t in shards[0].items()})
    ffn, vocab = layouts["layers.0.mlp.fc_in.weight"], layouts["embeddings.word_embeddings.weight"]
    assert (ffn.per_rank, [ffn.real_count(r) for r in range(4)]) == (32, [32, 8, 0, 0])
    assert (vocab.per_rank, [vocab.real_count(r) for r in range(4)]) == (32, [32, 32, 32, 4])
    assert layouts["layers.0.self_attn.qkv_proj.weight"].engine_full_shape((3 * H // 4, H)) == (3 * H, H)
    with pytest.raises(ValueError, match="replicated"):
        layouts["layers.0.attn_norm.weight"].real_count(0)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("module", sorted(LORA_MODULES))
def test_lora_layouts_split_as_the_base_layer(tp, module):
    """Column-parallel targets split B's rows, row-parallel ones A's columns; FFN matrices are
    padded like the FFN, and the other matrix is replicated."""
    shards = sglang_shards(hf_tensors(), tp)
    layouts = build_layouts(engine_config(tp), tp, {n: t.shape for n, t in shards[0].items()})
    fan_in, fan_out = module_dims(engine_config(tp), module)
    a, b = lora_layout(layouts, 0, module, "A"), lora_layout(layouts, 0, module, "B")
    row_parallel = module in ("o_proj", "down_proj")
    split, kept = (a, b) if row_parallel else (b, a)
    assert kept.replicated and split.split_dim == (1 if row_parallel else 0)
    assert split.real_size == (fan_in if row_parallel else fan_out)
    assert split.loader_pads == (module in ("fc_in", "down_proj"))
    full = torch.randn(3, fan_in) if row_parallel else torch.randn(fan_out, 3)
    padded = split.padded_for_loading(full)
    pieces = padded.chunk(tp, split.split_dim)
    assert torch.equal(split.gather(pieces), full)


def test_build_refuses_shapes_the_padding_rules_do_not_predict():
    shards = sglang_shards(hf_tensors(), 2)
    shapes = {n: t.shape for n, t in shards[0].items()}
    shapes["layers.0.mlp.fc_in.weight"] = (20, H)  # as if SGLang stopped padding the FFN
    with pytest.raises(SGLangLayoutError, match="fc_in.weight.*padding"):
        build_layouts(engine_config(2), 2, shapes)
    shapes = {n: t.shape for n, t in shards[0].items()}
    with pytest.raises(SGLangLayoutError, match="vocabulary rows"):
        build_layouts(engine_config(2), 2, shapes, vocab_ranges={"embeddings.word_embeddings.weight": (0, 50)})
    build_layouts(engine_config(2), 2, shapes, vocab_ranges={"embeddings.word_embeddings.weight": (64, 100)}, rank=1)


def test_tp_size_problems_name_what_does_not_divide():
    config = types.SimpleNamespace(num_attention_heads=12, intermediate_size=3072, vocab_size=50265)
    assert tp_size_problems(config, 2, "cpu") == []
    assert tp_size_problems(config, 8, "cpu") == ["num_attention_heads=12"]
    odd = types.SimpleNamespace(num_attention_heads=4, intermediate_size=30, vocab_size=100)
    assert tp_size_problems(odd, 4, "cuda") == ["intermediate_size=30"]
    assert tp_size_problems(odd, 4, "cpu") == []  # padded to 128 on CPU
    assert tp_size_problems(types.SimpleNamespace(num_attention_heads=3, intermediate_size=3, vocab_size=64), 3,
                            "cuda") == ["padded vocabulary 64"]


def test_module_dims_and_targets_declared_once():
    cfg = types.SimpleNamespace(hidden_size=8, intermediate_size=32, original_intermediate_size=20)
    assert module_dims(cfg, "fc_in") == (8, 20) and module_dims(cfg, "down_proj") == (20, 8)
    for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert module_dims(cfg, m) == (8, 8)
    # every family's LoRA target adapts a parameter the weight map fills from the HF module it names
    for names in (ROBERTA, MODERNBERT):
        for module, hf_module in names.lora_modules:
            target = LORA_TARGETS[module]
            rows = dict(names.engine_to_checkpoint_names(target.engine_weight(3)))
            assert rows[f"{names.layer_prefix}.3.{hf_module}.weight"] == target.part
    # ModernBERT's fused targets cover every part: Wqkv [3H, H], Wi [2I, H]
    assert module_dims(cfg, "qkv_proj") == (8, 24) and module_dims(cfg, "gate_up_proj") == (8, 40)


def test_replicated_layout_is_identity():
    layout = ParameterLayout("x")
    t = torch.randn(3, 2)
    assert layout.local(t, 0) is t and layout.gather([t, t + 1]) is t and layout.index(0, 2) == (slice(None),) * 2
