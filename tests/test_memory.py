"""What the engine keeps in memory (docs/memory.md): checkpoint tensors are read into memory of
their own, not handed out as views of the file's memory map, and the KV pool nobody reads is
allocated at one byte per element. No RSS thresholds here: ``benchmarks/bench_memory.py`` measures."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import max_abs_diff
from safetensors import safe_open
from safetensors.torch import save_file

from sglang_hf_bridge import checkpoint
from sglang_hf_bridge.checkpoint import CheckpointFiles, iter_checkpoint_tensors
from sglang_hf_bridge.engine.config import UNREAD_KV_CACHE_DTYPE, EngineConfig

needs_proc_maps = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps")


def _mapped_file(address: int) -> str:
    """The file mapped at ``address`` in this process ('' for anonymous memory)."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                return fields[5].strip() if len(fields) > 5 else ""
    return ""


def _tensors():
    torch.manual_seed(0)
    return {
        "f32": torch.randn(64, 33), "f16": torch.randn(7).half(), "bf16": torch.randn(2, 3, 4).bfloat16(),
        "f64": torch.randn(5, dtype=torch.float64), "i64": torch.arange(10), "bool": torch.tensor([True, False]),
        "u8": torch.arange(6, dtype=torch.uint8), "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4),
    }


def _save(tmp_path):
    path = os.path.join(tmp_path, "model.safetensors")
    tensors = _tensors()
    save_file(tensors, path)
    return tensors, path, CheckpointFiles(str(tmp_path), [path], "safetensors")


@needs_proc_maps
def test_checkpoint_tensors_are_copies_not_views_of_the_file_map(tmp_path):
    """The bug: ``safe_open(...).get_tensor`` returns a view of the handle's mmap of the file; every
    page the engine's loader copied stayed resident until the shard's handle closed, so loading held
    the engine's weights and the whole file at once (roberta-base float32: +476 MiB at the peak). The
    loader now reads each tensor into memory of its own; values, dtypes and shapes are unchanged."""
    tensors, path, files = _save(tmp_path)
    with safe_open(path, framework="pt", device="cpu") as f:
        assert _mapped_file(f.get_tensor("f32").data_ptr()) == path  # what safetensors hands out
    got = dict(iter_checkpoint_tensors(files))
    assert sorted(got) == sorted(tensors)
    for name, expected in tensors.items():
        assert got[name].dtype == expected.dtype and got[name].shape == expected.shape
        assert torch.equal(got[name], expected), name
        if expected.numel():
            assert _mapped_file(got[name].data_ptr()) != path, name
    assert sorted(dict(iter_checkpoint_tensors(files, skip=["f32", "bool"]))) == sorted(set(tensors) - {"f32", "bool"})


def test_checkpoint_reader_falls_back_to_safetensors_for_what_it_does_not_copy(tmp_path, monkeypatch):
    """A dtype the reader does not map itself (or a header entry that disagrees with ``safe_open``)
    is read by ``get_tensor``: same values, nothing refused."""
    tensors, _, files = _save(tmp_path)
    monkeypatch.setattr(checkpoint, "_SAFETENSORS_DTYPES", {})
    got = dict(iter_checkpoint_tensors(files))
    for name, expected in tensors.items():
        assert got[name].dtype == expected.dtype and torch.equal(got[name], expected), name


def test_unread_kv_pool_is_asked_for_at_one_byte_per_element():
    """Only the CPU sdpa path (nothing reads the pool) gets the one-byte KV dtype; the backend path
    keeps the model's dtype, and a user's ``kv_cache_dtype=`` wins."""
    def kwargs(**options):
        return EngineConfig(model_path="/x", architecture="X", **options).server_args_kwargs(dist_port=1)

    assert kwargs()["kv_cache_dtype"] == UNREAD_KV_CACHE_DTYPE  # sdpa is the default
    assert "kv_cache_dtype" not in kwargs(encoder_attention="backend")
    assert "kv_cache_dtype" not in kwargs(device="cuda")
    assert kwargs(engine_options={"kv_cache_dtype": "auto"})["kv_cache_dtype"] == "auto"


def test_sdpa_engine_pool_holds_every_slot_at_one_byte_and_answers_are_unchanged(roberta):
    """The engine SGLang starts with the one-byte dtype: the pool's slots (the token budget) are
    all there, its buffers hold no memory (``compat.release_unread_kv_memory``), answers match."""
    hf, model = roberta
    assert model.runtime.config.encoder_attention == "sdpa"
    pool = model.runtime.model_runner.token_to_kv_pool
    assert all(t.is_meta and t.element_size() == 1 for t in pool.k_buffer + pool.v_buffer)
    assert model.engine_pool_capacity()["free_kv_slots"] >= model.runtime.config.max_num_tokens
    ids = torch.tensor([[0, 5, 6, 7, 2], [0, 8, 9, 2, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    with torch.no_grad():
        assert max_abs_diff(model(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits) <= 1e-5
