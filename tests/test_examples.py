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
