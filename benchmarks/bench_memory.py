"""Resident memory of one model in its own process: transformers against the engine with each
attention path, after loading and at the peak of a batch-of-32 ``compute_mlm_logits``-equivalent call.

roberta-base shape (random weights), float32, SST-2 prompts, the engine with its default token
budget (8,192) and LoRA machinery on. Each case runs in a fresh interpreter so one case's
allocations do not count for another; RSS is read from the process (``psutil``), the peak is
``ru_maxrss`` (includes the import of SGLang and the model load).

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

CASES = {
    "transformers sdpa (LM head at the mask)": "hf",
    'engine, encoder_attention="sdpa" (CPU default)': "sdpa",
    'engine, encoder_attention="backend" (SGLang attention backend)': "backend",
}

CHILD = r"""
import json, resource, sys, torch, psutil
sys.path.insert(0, {bench!r})
from _common import TOKENIZER_DIR, prompts, roberta_base_checkpoint
from transformers import AutoTokenizer
case = {case!r}
ckpt = roberta_base_checkpoint()
tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
batch = tok(prompts(32), return_tensors="pt", padding=True)
rss = lambda: psutil.Process().memory_info().rss / 2**20
if case == "hf":
    from transformers import RobertaForMaskedLM
    model = RobertaForMaskedLM.from_pretrained(ckpt, attn_implementation="sdpa").eval()
    loaded = rss()
    with torch.inference_mode():
        hidden = model.roberta(**batch)[0]
        model.lm_head(hidden[batch["input_ids"] == tok.mask_token_id])
else:
    from sglang_hf_bridge import SGLangRobertaForMaskedLM
    model = SGLangRobertaForMaskedLM.from_pretrained(ckpt, encoder_attention=case)
    loaded = rss()
    model.compute_mlm_logits(**batch)
after = rss()
print(json.dumps({{"rss_after_load_mib": loaded, "rss_after_call_mib": after,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "memory.json")
    args = ap.parse_args()
    bench_dir = str(Path(__file__).resolve().parent)
    rows = []
    for name, case in CASES.items():
        code = CHILD.format(bench=bench_dir, case=case)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, cwd=str(REPO))
        if r.returncode != 0:
            raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")
        row = {"model": name, **json.loads(r.stdout.strip().splitlines()[-1])}
        print(f"{name}: {row}", flush=True)
        rows.append(row)
    base = rows[0]["rss_after_call_mib"]
    for row in rows:
        row["vs_transformers"] = row["rss_after_call_mib"] / base
    report("bench_memory: resident MiB, roberta-base shape, float32, batch of 32 prompts", rows,
           ["model", "rss_after_load_mib", "rss_after_call_mib", "peak_rss_mib", "vs_transformers"], args.out)


if __name__ == "__main__":
    main()
