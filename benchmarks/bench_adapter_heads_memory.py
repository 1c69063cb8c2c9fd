"""Resident memory for serving N classifier variants (default 8), each a PEFT SEQ_CLS LoRA adapter
with its own head (``modules_to_save``): the question per-row classifier adapters answer is "one
base model + N small adapters instead of N full models", so measure what each way keeps resident.

roberta-base shape (random weights, bench_heads.classifier_checkpoint), float32, num_labels=2; N
PEFT SEQ_CLS adapters, r=8 on query+value with random B and a perturbed copy of the classifier each,
built once in the parent and cached beside the checkpoint in the temp dir. One batch of N x
``--rows-per-adapter`` SST-2 sentences (default 32), rows in adapter order. Each case runs in a
fresh interpreter, measured as bench_memory.py measures (psutil RSS; ``call_peak_mib`` is VmHWM
reset just before the call; ``peak_rss_mib`` the whole process's, from VmHWM too: a child's
ru_maxrss starts at the parent's RSS at fork, and this parent held models while building adapters):

1. N merged transformers models -- base + one adapter, ``merge_and_unload()``, every parameter
   cloned to private memory: N separately saved checkpoints share no pages in real life (here they
   would share the base's safetensors mmap), so this is what N deployed models cost. Each model
   runs its own rows.
2. PEFT, one model + N adapters -- ``PeftModel.from_pretrained`` + ``load_adapter``, one call with
   ``adapter_names=`` (PEFT's mixed batch); if that raises (peft 0.21: mixed batches refuse a
   ``modules_to_save`` head that is not a single Linear), the error is recorded and N sequential
   ``set_adapter`` calls on each adapter's rows are measured instead (labelled); the failed
   attempt's peak is kept apart (``failed_mixed_call_peak_mib``).
3. engine + N adapters per row -- SGLangRobertaForSequenceClassification(max_loras=N,
   max_lora_rank=8), one call with ``adapter_names=`` per row.

Each child saves its logits; the parent prints the max abs difference of the engine's (and the
merged models') logits from PEFT's, row by row. Ratios (``*_vs_best``) divide by the smallest value
of each column.

    python benchmarks/bench_adapter_heads_memory.py [--adapters 8] [--rows-per-adapter 4]
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, report  # noqa: E402
from bench_heads import classifier_checkpoint  # noqa: E402

RANK = 8
CASES = {
    "merged": "{n} merged transformers models",
    "peft": "PEFT, one model + {n} adapters, mixed batch",
    "engine": "engine + {n} adapters per row",
}

CHILD = r"""
import gc, json, re, sys, torch, psutil
sys.path.insert(0, {bench!r})
from _common import TOKENIZER_DIR, read_sentences
from transformers import AutoTokenizer
case, ckpt, dirs, rows_per, logits_out = {case!r}, {ckpt!r}, {dirs!r}, {rows_per!r}, {logits_out!r}
names = ["a%d" % i for i in range(len(dirs))]
sentences = read_sentences()
n_rows = len(dirs) * rows_per
tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
batch = tok([sentences[i % len(sentences)] for i in range(n_rows)], return_tensors="pt", padding=True)
row_names = [names[i // rows_per] for i in range(n_rows)]
rss = lambda: psutil.Process().memory_info().rss / 2**20
out = {{}}

from _memory_probe import parts as _parts, peak_since_reset, reset_peak as _reset_peak
parts = lambda when: _parts(out, when)
reset_peak = lambda: _reset_peak(out)

def rows(i):
    return {{k: v[i * rows_per:(i + 1) * rows_per] for k, v in batch.items()}}

if case in ("merged", "peft"):
    from peft import PeftModel
    from transformers import RobertaForSequenceClassification
    load = lambda: RobertaForSequenceClassification.from_pretrained(ckpt, attn_implementation="sdpa")
    out["rss_after_import_mib"] = rss()
    if case == "merged":
        models = []
        for d in dirs:
            m = PeftModel.from_pretrained(load(), d).merge_and_unload().eval()
            for p in m.parameters():
                p.data = p.data.clone()  # private pages, as N separate checkpoints would be
            models.append(m)
            gc.collect()
    else:
        model = PeftModel.from_pretrained(load(), dirs[0], adapter_name=names[0])
        for name, d in zip(names[1:], dirs[1:]):
            model.load_adapter(d, adapter_name=name)
        model.eval()
    out["rss_after_load_mib"] = rss()
    parts("load")
    reset_peak()
    with torch.inference_mode():
        if case == "merged":
            logits = torch.cat([m(**rows(i)).logits for i, m in enumerate(models)])
            out["call"] = "each model its own rows"
        else:
            try:
                logits = model(**batch, adapter_names=row_names).logits
                out["call"] = "mixed batch (adapter_names=)"
            except Exception as e:  # noqa: BLE001 -- recorded, then the sequential fallback
                out["mixed_batch_error"] = f"{{type(e).__name__}}: {{e}}"
                # PEFT leaves its adapter_names pre-forward hooks behind when the forward raises
                # (no try/finally in _enable_peft_forward_hooks): remove them, or every later call
                # gets the failed call's adapter_names.
                from peft.tuners.lora.model import _adapter_names_pre_forward_hook as stale
                removed = 0
                for mod in model.modules():
                    for key, hook in list(mod._forward_pre_hooks.items()):
                        if getattr(hook, "func", None) is stale:
                            del mod._forward_pre_hooks[key]
                            mod._forward_pre_hooks_with_kwargs.pop(key, None)
                            removed += 1
                out["stale_peft_hooks_removed"] = removed
                gc.collect()
                # the failed attempt's peak is kept apart: the sequential path is measured on its own
                out["failed_mixed_call_peak_mib"] = peak_since_reset()
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                parts_ = []
                for i, name in enumerate(names):
                    model.set_adapter(name)
                    parts_.append(model(**rows(i)).logits)
                logits = torch.cat(parts_)
                out["call"] = "sequential set_adapter (mixed batch raised)"
else:
    from sglang_hf_bridge import SGLangRobertaForSequenceClassification, log_control
    log_control.import_sglang_quietly()  # what from_pretrained imports first, counted apart
    out["rss_after_import_mib"] = rss()
    model = SGLangRobertaForSequenceClassification.from_pretrained(ckpt, device="cpu", max_loras=len(dirs),
                                                                   max_lora_rank={rank})
    for name, d in zip(names, dirs):
        model.load_adapter(d, adapter_name=name)
    out["rss_after_load_mib"] = rss()
    parts("load")
    reset_peak()
    logits = model(**batch, adapter_names=row_names).logits
    out["call"] = "one call, adapter_names= per row"
out["call_peak_mib"] = peak_since_reset()
out["rss_after_call_mib"] = rss()
parts("call")
out["peak_rss_mib"] = max(out["peak_rss_mib"], out["call_peak_mib"])
out["child_processes"] = len(psutil.Process().children(recursive=True))
torch.save(logits.detach().float().cpu(), logits_out)
if case == "engine":
    model.close()
print(json.dumps(out))
"""

MEASURED = ["rss_after_import_mib", "rss_after_load_mib", "rss_after_call_mib", "call_peak_mib", "peak_rss_mib"]
RATIOS = {"rss_after_import_mib": "import_vs_best", "rss_after_load_mib": "load_vs_best",
          "rss_after_call_mib": "call_vs_best", "call_peak_mib": "call_peak_vs_best", "peak_rss_mib": "peak_vs_best"}
COLUMNS = ["case", *MEASURED, *RATIOS.values()]


def build_adapters(ckpt: Path, n: int) -> list:
    """N PEFT SEQ_CLS adapters on the checkpoint (r=8, query+value, random B, the head perturbed by its
    init scale: logits of a few units, as a trained classifier's), cached."""
    root = ckpt.parent
    dirs = [root / f"{ckpt.name}-seqcls-lora-r{RANK}-{i}" for i in range(n)]
    missing = [i for i, d in enumerate(dirs) if not (d / "adapter_model.safetensors").exists()]
    if missing:
        from peft import LoraConfig, get_peft_model
        from transformers import RobertaForSequenceClassification

        hf = RobertaForSequenceClassification.from_pretrained(ckpt).eval()
        for i in missing:
            torch.manual_seed(1000 + i)
            cfg = LoraConfig(task_type="SEQ_CLS", r=RANK, lora_alpha=2 * RANK, target_modules=["query", "value"],
                             init_lora_weights=False)
            model = get_peft_model(copy.deepcopy(hf), cfg)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "modules_to_save" in name:
                        p.add_(torch.randn_like(p) * hf.config.initializer_range)
            model.save_pretrained(dirs[i])
            del model
    return [str(d) for d in dirs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rows-per-adapter", type=int, default=4)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "adapter_heads_memory.json")
    args = ap.parse_args()
    n, per = args.adapters, args.rows_per_adapter
    ckpt = classifier_checkpoint()
    dirs = build_adapters(ckpt, n)
    bench_dir = str(Path(__file__).resolve().parent)
    work_dir = tempfile.TemporaryDirectory(prefix="bench-adapter-heads-memory-")
    work = Path(work_dir.name)
    rows, logits = [], {}
    for case, label in CASES.items():
        name = label.format(n=n)
        code = CHILD.format(bench=bench_dir, case=case, ckpt=str(ckpt), dirs=dirs, rows_per=per,
                            logits_out=str(work / f"{case}.pt"), rank=RANK)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800, cwd=str(REPO))
        if r.returncode != 0:
            raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")
        row = {"case": name, **json.loads(r.stdout.strip().splitlines()[-1])}
        if case == "peft" and "mixed_batch_error" in row:
            row["case"] = f"PEFT, one model + {n} adapters, sequential set_adapter (mixed batch raised)"
        print(f"{row['case']}: {row}", flush=True)
        rows.append(row)
        logits[case] = torch.load(work / f"{case}.pt")
    for col, ratio in RATIOS.items():
        best = min(row[col] for row in rows)
        for row in rows:
            row[ratio] = row[col] / best
    ref = logits["peft"]
    diffs = {f"{case}_vs_peft_max_abs_diff": (logits[case] - ref).abs().max().item() for case in ("engine", "merged")}
    diffs["engine_vs_merged_max_abs_diff"] = (logits["engine"] - logits["merged"]).abs().max().item()
    diffs["max_abs_logit"] = ref.abs().max().item()
    for k, v in diffs.items():
        print(f"{k}: {v:.3e}")
    ok = diffs["engine_vs_peft_max_abs_diff"] <= 1e-5 and diffs["engine_vs_merged_max_abs_diff"] <= 1e-5
    print(f"engine logits equal PEFT's and the merged models' within 1e-5: {ok}")
    extra = {"adapters": n, "rows_per_adapter": per, "lora_rank": RANK, "target_modules": ["query", "value"],
             "checkpoint": str(ckpt), "logits_check": {**diffs, "tolerance": 1e-5, "ok": ok}}
    report(f"bench_adapter_heads_memory: resident MiB, {n} classifier variants (roberta-base shape, float32, "
           f"SEQ_CLS LoRA r={RANK} + own head), batch of {n * per} sentences", rows, COLUMNS, args.out, extra)


if __name__ == "__main__":
    main()
