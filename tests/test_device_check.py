"""benchmarks/device_check.py keeps working: its CPU smoke run (tiny model) passes every check.

The script is what a GPU session runs (``--device cuda``); running its CPU path here in CI means
its code cannot rot between the sessions that have a GPU. About 25 s on the 2-core host.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

SCRIPT = REPO / "benchmarks" / "device_check.py"


def test_device_check_cpu_smoke(tmp_path):
    out = tmp_path / "device_check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--smoke", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    assert "ALL OK" in proc.stdout
    report = json.loads(out.read_text())
    assert report["ok"] and report["device"] == "cpu" and report["smoke"]
    seen = {(r["check"], r["dtype"]) for r in report["rows"]}
    for dtype in ("float32", "bfloat16", "float16"):
        assert {("parity", dtype), ("lora", dtype), ("caches", dtype)} <= seen, dtype
    assert ("mezo", "float32") in seen
    assert {("speed", "float32"), ("speed", "bfloat16")} <= seen
    assert all(r["ok"] for r in report["rows"])
    # every half-precision accuracy row is judged against transformers' own error in that dtype
    half = [r for r in report["rows"] if r["check"] in ("parity", "lora") and r["dtype"] != "float32"
            and "abs err vs fp32" in r["metric"]]
    assert half and all("transformers" in r["metric"] and r["limit"] > 0 for r in half)


def test_device_check_refuses_cuda_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA: the refusal cannot happen here (the device check runs for real instead)")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda", "--out", str(tmp_path / "x.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
