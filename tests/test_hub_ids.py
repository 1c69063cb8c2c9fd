"""Models and adapters named by Hugging Face Hub id, resolved as transformers and PEFT resolve them,
offline from a cache laid out as huggingface_hub writes it (``models--org--name/refs/<branch>``,
``snapshots/<commit>/`` files linked into ``blobs/``): ``cache_dir=``, ``revision=`` (branch, tag
file, commit), ``subfolder=``, sharded weights, ``local_files_only=``, ``HF_HUB_OFFLINE=1``, and
tensor-parallel ranks reading the same snapshot. The oracle: transformers' own ``from_pretrained``
with the same id and keywords."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, build_checkpoint, max_abs_diff
from transformers import RobertaForMaskedLM

from sglang_hf_bridge import (
    CheckpointError,
    CheckpointNotFoundError,
    SGLangAutoModelForMaskedLM,
    SGLangRobertaForMaskedLM,
)

TOL = 1e-5
IDS = torch.tensor([[0, 31, 41, 51, 2], [0, 61, 2, 1, 1]])


def add_to_hub_cache(cache: Path, repo_id: str, source: Path, commit: str, branch: str = "main",
                     prefix: str = "") -> Path:
    """Lay ``source``'s files out as huggingface_hub's cache does (blobs named by content, the
    snapshot's files as relative links to them, ``refs/<branch>`` naming the commit); ``prefix``
    puts them in a subfolder of the repository. Returns the snapshot directory."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / prefix / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / branch).write_text(commit)
    return snapshot


COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """org/tiny-roberta: main -> commit B (seed 2, sharded), tag v1 -> commit A (seed 1); and
    org/nested with the checkpoint in subfolder "mlm"."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "cache"
    models = {}
    for seed, commit, branch, shard in ((1, COMMIT_A, "v1", None), (2, COMMIT_B, "main", "20KB")):
        src = root / f"src{seed}"
        models[commit] = build_checkpoint(src, "roberta", seed=seed, vocab_size=300)
        if shard:  # re-save sharded: an index plus several files
            models[commit].save_pretrained(src, max_shard_size=shard)
        add_to_hub_cache(cache, "org/tiny-roberta", src, commit, branch)
    assert len(list((cache / "models--org--tiny-roberta" / "snapshots" / COMMIT_B).glob("*.safetensors"))) > 1
    nested = root / "src-nested"
    models["nested"] = build_checkpoint(nested, "roberta", seed=3, vocab_size=300)
    add_to_hub_cache(cache, "org/nested", nested, COMMIT_A, prefix="mlm")
    return cache, models


def logits_of(model):
    return model(input_ids=IDS, attention_mask=(IDS != 1).long()).logits


def reference_logits(hf):
    with torch.no_grad():
        return hf(input_ids=IDS, attention_mask=(IDS != 1).long()).logits


@pytest.mark.parametrize("revision, commit", [(None, COMMIT_B), ("main", COMMIT_B), ("v1", COMMIT_A),
                                              (COMMIT_A, COMMIT_A)])
def test_hub_id_from_the_cache(hub_cache, revision, commit):
    cache, models = hub_cache
    kwargs = dict(cache_dir=cache, local_files_only=True, revision=revision)
    reference = RobertaForMaskedLM.from_pretrained("org/tiny-roberta", **kwargs)
    assert max_abs_diff(reference_logits(reference), reference_logits(models[commit])) == 0
    with SGLangRobertaForMaskedLM.from_pretrained("org/tiny-roberta", **kwargs) as model:
        assert max_abs_diff(logits_of(model), reference_logits(reference)) <= TOL
        assert f"snapshots/{commit}" in model.runtime.config.model_path


def test_subfolder_and_auto_class(hub_cache):
    cache, models = hub_cache
    kwargs = dict(cache_dir=cache, local_files_only=True, subfolder="mlm")
    with SGLangAutoModelForMaskedLM.from_pretrained("org/nested", **kwargs) as model:
        assert isinstance(model, SGLangRobertaForMaskedLM)
        assert max_abs_diff(logits_of(model), reference_logits(models["nested"])) <= TOL


def test_unknown_ids_get_transformers_kind_of_error(hub_cache, tmp_path):
    cache, _ = hub_cache
    for name in ("org/not-cached", "/no/such/dir", "not a valid id!!"):
        with pytest.raises(OSError):  # transformers
            RobertaForMaskedLM.from_pretrained(name, cache_dir=cache, local_files_only=True)
        with pytest.raises(CheckpointNotFoundError) as ours:
            SGLangRobertaForMaskedLM.from_pretrained(name, cache_dir=cache, local_files_only=True)
        assert isinstance(ours.value, OSError) and isinstance(ours.value, CheckpointError)
        assert repr(name) in str(ours.value)
    with pytest.raises(CheckpointNotFoundError, match="org/tiny-roberta"):  # a revision the cache lacks
        SGLangRobertaForMaskedLM.from_pretrained("org/tiny-roberta", cache_dir=cache, local_files_only=True,
                                                 revision="v9")


def test_offline_script_names_models_by_id(hub_cache, tmp_path):
    """A user's script, unchanged but for the class name, with HF_HUB_OFFLINE=1 and HF_HUB_CACHE
    pointing at the cache: the id resolves with no keyword at all, as in transformers."""
    cache, models = hub_cache
    script = tmp_path / "user_script.py"
    script.write_text(
        "import torch\n"
        "from sglang_hf_bridge import SGLangAutoModelForMaskedLM\n"
        "model = SGLangAutoModelForMaskedLM.from_pretrained('org/tiny-roberta')\n"
        "ids = torch.tensor([[0, 31, 41, 51, 2], [0, 61, 2, 1, 1]])\n"
        "torch.save(model(input_ids=ids, attention_mask=(ids != 1).long()).logits, 'logits.pt')\n"
        "model.close()\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(tmp_path / "logits.pt")
    assert max_abs_diff(got, reference_logits(models[COMMIT_B])) <= TOL


def test_tensor_parallel_ranks_read_the_resolved_snapshot(hub_cache, tmp_path):
    """tp_size=2 from a Hub id whose snapshot is sharded and carries tensors the model does not use:
    the worker rank reads the files rank 0 resolved and skips the same tensors."""
    cache, models = hub_cache
    cache2 = tmp_path / "cache"
    shutil.copytree(cache, cache2, symlinks=True)
    snapshot = cache2 / "models--org--tiny-roberta" / "snapshots" / COMMIT_B
    from safetensors.torch import save_file

    save_file({"classifier.dense.weight": torch.randn(4, 64), "roberta.pooler.dense.bias": torch.randn(64)},
              snapshot / "extra.safetensors")
    import json

    index = json.loads((snapshot / "model.safetensors.index.json").read_text())
    index["weight_map"].update({"classifier.dense.weight": "extra.safetensors",
                                "roberta.pooler.dense.bias": "extra.safetensors"})
    (snapshot / "model.safetensors.index.json").unlink()  # a link into blobs/: replace, never write through
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(index))
    model, info = SGLangRobertaForMaskedLM.from_pretrained("org/tiny-roberta", cache_dir=cache2,
                                                           local_files_only=True, tp_size=2, output_loading_info=True)
    with model:
        # transformers 5.19 reports unexpected keys of single-file checkpoints (tested in
        # test_checkpoints_in_the_wild) but not of sharded ones; the bridge reports them either way.
        assert info == {"missing_keys": set(), "mismatched_keys": set(), "error_msgs": [],
                        "unexpected_keys": {"classifier.dense.weight", "roberta.pooler.dense.bias"}}
        assert max_abs_diff(logits_of(model), reference_logits(models[COMMIT_B])) <= TOL


def test_adapter_by_hub_id_as_peft_loads_it(hub_cache, tmp_path, monkeypatch):
    """model.load_adapter("org/adapter", revision=...) resolves as PeftModel.from_pretrained does."""
    import copy

    import huggingface_hub
    from peft import LoraConfig, PeftModel, get_peft_model

    # PEFT reads the adapter weights from the cache only in offline mode (local_files_only is not
    # passed on to that download); the bridge needs no such switch.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    cache, models = hub_cache
    base = models[COMMIT_B]
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                          init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    add_to_hub_cache(cache, "org/tiny-adapter", tmp_path / "adapter", COMMIT_A, branch="v2")
    kwargs = dict(cache_dir=cache, local_files_only=True, revision="v2")
    reference = PeftModel.from_pretrained(copy.deepcopy(base), "org/tiny-adapter", **kwargs).eval()
    monkeypatch.undo()
    with SGLangRobertaForMaskedLM.from_pretrained("org/tiny-roberta", cache_dir=cache, local_files_only=True) as model:
        model.load_adapter("org/tiny-adapter", adapter_name="hub", **kwargs)
        assert max_abs_diff(logits_of(model), reference_logits(reference)) <= TOL
        from sglang_hf_bridge import AdapterFileError

        with pytest.raises(AdapterFileError, match="org/no-such-adapter"):
            model.load_adapter("org/no-such-adapter", adapter_name="other", cache_dir=cache, local_files_only=True)
        assert model.active_adapter() == "hub"
