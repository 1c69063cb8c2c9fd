"""Resident memory of one model in its own process: transformers against the engine, after
importing the model's library, after loading, after two batch-of-32 ``compute_mlm_logits``-equivalent
calls (the second in the steady state: the packed GEMM path packs its weights then), and at the
peaks. Where each MiB goes, and what cannot be given back: docs/memory.md.

roberta-base shape (random weights), float32, SST-2 prompts, the engine with its default token
budget (8,192). Each case runs in a fresh interpreter so one case's allocations do not count for
another. Columns (MiB):

* ``rss_after_import_mib`` -- after importing the model's library (transformers' RobertaForMaskedLM;
  the bridge and the SGLang modules the engine uses), before any model; torch, transformers and the
  tokenizer are already loaded in every case.
* ``rss_after_load_mib`` / ``anon_after_load_mib`` / ``file_after_load_mib`` -- ``psutil`` RSS after
  ``from_pretrained``, and its anonymous vs file-backed parts (``/proc/self/smaps_rollup``).
  transformers maps the safetensors file and its parameters ARE the map: pages become resident only
  when the first call reads them, so its after-load number holds no weights; compare after the call.
* ``rss_after_call_mib`` / ``anon_after_call_mib`` / ``file_after_call_mib`` -- the same after the call.
* ``call_peak_mib`` -- the process's peak RSS during the call alone (``VmHWM``, reset through
  ``/proc/self/clear_refs`` just before it): the call's scratch on top of the loaded model.
* ``peak_rss_mib`` -- the whole process's peak (import, load and call): ``VmHWM`` read before the
  reset, or the call's peak if higher (not ``ru_maxrss``: a child's starts at its parent's RSS).
* ``rss_after_trim_mib`` -- after the call and glibc's ``malloc_trim(0)``: what the allocator held
  without using it.

    python benchmarks/bench_memory.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, report  # noqa: E402

# name -> (case, from_pretrained keywords of the engine)
CASES = {
    "transformers sdpa (LM head at the mask)": ("hf", {}),
    "transformers sdpa, forward (logits at every position)": ("hf", {"task": "forward"}),
    'engine, "sdpa", enable_lora=False, forward (logits at every position)':
        ("engine", {"encoder_attention": "sdpa", "enable_lora": False, "task": "forward"}),
    'engine, encoder_attention="sdpa" (CPU default)': ("engine", {"encoder_attention": "sdpa"}),
    'engine, "sdpa", enable_lora=False': ("engine", {"encoder_attention": "sdpa", "enable_lora": False}),
    'engine, "sdpa", enable_lora=False, gemm="onednn" (no packed weight copies)':
        ("engine", {"encoder_attention": "sdpa", "enable_lora": False, "gemm": "onednn"}),
    'engine, encoder_attention="backend" (SGLang attention backend)': ("engine", {"encoder_attention": "backend"}),
}

CHILD = r"""
import ctypes, json, sys, torch, psutil
sys.path.insert(0, {bench!r})
from _common import TOKENIZER_DIR, prompts, roberta_base_checkpoint
from transformers import AutoTokenizer
case, options = {case!r}, {options!r}
task = options.pop("task", "mask")
ckpt = roberta_base_checkpoint()
tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
batch = tok(prompts(32), return_tensors="pt", padding=True)
rss = lambda: psutil.Process().memory_info().rss / 2**20
out = {{}}

from _memory_probe import parts as _parts, peak_since_reset, reset_peak as _reset_peak
parts = lambda when: _parts(out, when)
reset_peak = lambda: _reset_peak(out)

if case == "hf":
    from transformers import RobertaForMaskedLM
    out["rss_after_import_mib"] = rss()
    model = RobertaForMaskedLM.from_pretrained(ckpt, attn_implementation="sdpa").eval()
    out["rss_after_load_mib"] = rss()
    parts("load")
    reset_peak()
    with torch.inference_mode():
        for _ in range(2):
            if task == "forward":
                model(**batch).logits
            else:
                hidden = model.roberta(**batch)[0]
                model.lm_head(hidden[batch["input_ids"] == tok.mask_token_id])
else:
    from sglang_hf_bridge import SGLangRobertaForMaskedLM, log_control
    log_control.import_sglang_quietly()  # what from_pretrained imports first, counted apart
    out["rss_after_import_mib"] = rss()
    model = SGLangRobertaForMaskedLM.from_pretrained(ckpt, **options)
    out["rss_after_load_mib"] = rss()
    parts("load")
    reset_peak()
    for _ in range(2):  # the second call runs in the steady state (the packed GEMM path's copies made)
        model(**batch).logits if task == "forward" else model.compute_mlm_logits(**batch)
    out["gemm"] = model.runtime.config.gemm
out["call_peak_mib"] = peak_since_reset()
out["rss_after_call_mib"] = rss()
parts("call")
out["peak_rss_mib"] = max(out["peak_rss_mib"], out["call_peak_mib"])
ctypes.CDLL("libc.so.6").malloc_trim(0)
out["rss_after_trim_mib"] = rss()
print(json.dumps(out))
"""

COLUMNS = ["model", "gemm", "rss_after_import_mib", "rss_after_load_mib", "anon_after_load_mib",
           "file_after_load_mib", "rss_after_call_mib", "anon_after_call_mib", "file_after_call_mib", "call_peak_mib",
           "peak_rss_mib", "rss_after_trim_mib", "load_vs_transformers", "call_vs_transformers", "peak_vs_transformers"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "memory.json")
    args = ap.parse_args()
    bench_dir = str(Path(__file__).resolve().parent)
    rows = []
    for name, (case, options) in CASES.items():
        code = CHILD.format(bench=bench_dir, case=case, options=options)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, cwd=str(REPO))
        if r.returncode != 0:
            raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")
        row = {"model": name, "gemm": "", **json.loads(r.stdout.strip().splitlines()[-1])}
        print(f"{name}: {row}", flush=True)
        rows.append(row)
    for row in rows:
        base = rows[1] if "forward" in row["model"] else rows[0]  # transformers on the same task
        row["load_vs_transformers"] = row["rss_after_load_mib"] / base["rss_after_load_mib"]
        row["call_vs_transformers"] = row["rss_after_call_mib"] / base["rss_after_call_mib"]
        row["peak_vs_transformers"] = row["peak_rss_mib"] / base["peak_rss_mib"]
    report("bench_memory: resident MiB, roberta-base shape, float32, two calls on a batch of 32 prompts", rows,
           COLUMNS, args.out)


if __name__ == "__main__":
    main()
