"""MeZO step time and peak memory: transformers (reference way) vs MeZOTrainer on the engine.

roberta-base shape (random weights), 64 prompts of the k=512 SST-2 split, label words
" terrible"/" great". Each case runs in its own process (peak RSS is per process):
(a) a MeZO step on transformers done the reference way (padded batch, LM head only at the mask,
label-word logits), (b) MeZOTrainer full-parameter on the engine, (c) LoRA (r=8, query+value)
with sequential +/- passes, (d) LoRA with the paired +/- adapter batch, (e) one backprop AdamW
step on transformers (memory), and the engine's inference peak (compute_mlm_logits on the batch).

    python benchmarks/bench_mezo.py [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SST2_SPLITS, TOKENIZER_DIR, report, roberta_base_checkpoint  # noqa: E402

CASES = {
    "a": "MeZO step, transformers (reference way: mask-only LM head)",
    "a2": "MeZOTrainer full-parameter, transformers",
    "b": "MeZOTrainer full-parameter, engine",
    "c": "MeZOTrainer LoRA, sequential +/- passes, engine",
    "d": "MeZOTrainer LoRA, paired +/- batch, engine",
    "e": "backprop AdamW step, transformers",
    "inference": "engine inference (compute_mlm_logits)",
}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(case: str, steps: int) -> dict:
    from transformers import AutoTokenizer, RobertaForMaskedLM

    from sglang_hf_bridge import SGLangRobertaForMaskedLM
    from sglang_hf_bridge.training import (
        MeZOTrainer,
        MeZOTrainingArguments,
        PromptClassifier,
        PromptCollator,
        PromptTemplate,
        load_lmbff_tsv,
    )

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    template = PromptTemplate()
    label_ids = template.label_word_ids(tok)
    rows = load_lmbff_tsv(SST2_SPLITS / "512-42" / "train.tsv")[:64]
    batch = PromptCollator(tok, template)(rows)
    ckpt = roberta_base_checkpoint()
    times = []

    if case == "a2":
        hf = RobertaForMaskedLM.from_pretrained(ckpt, attn_implementation="sdpa").eval()
        clf = PromptClassifier(hf, label_ids, tok.mask_token_id)
        args = MeZOTrainingArguments(output_dir="/tmp/bench-mezo", learning_rate=1e-6, zo_eps=1e-3, report_to=[],
                                     use_cpu=True, remove_unused_columns=False, zo_trainable="all")
        trainer = MeZOTrainer(model=clf, args=args)
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            trainer.training_step(clf, dict(batch))
            times.append(time.perf_counter() - t0)
    elif case in ("a", "e"):
        hf = RobertaForMaskedLM.from_pretrained(ckpt, attn_implementation="sdpa").eval()

        def loss_fn():
            hidden = hf.roberta(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            logits = hf.lm_head(hidden[batch["input_ids"] == tok.mask_token_id])[:, label_ids]
            return torch.nn.functional.cross_entropy(logits, batch["labels"])

        if case == "a":
            # princeton-nlp/MeZO's trainer: torch.manual_seed(seed), then per parameter
            # z = torch.normal(...) for each of the four passes (+eps, -2eps, +eps, update).
            params = [p for p in hf.parameters()]

            def perturb(seed, scale):
                torch.manual_seed(seed)
                for p in params:
                    z = torch.normal(mean=0, std=1, size=p.data.size(), dtype=p.data.dtype)
                    p.data = p.data + scale * z

            for step in range(steps + 1):
                t0 = time.perf_counter()
                with torch.no_grad():
                    perturb(step, 1e-3)
                    lp = float(loss_fn())
                    perturb(step, -2e-3)
                    lm = float(loss_fn())
                    perturb(step, 1e-3)
                    g = (lp - lm) / 2e-3
                    torch.manual_seed(step)
                    for p in params:
                        z = torch.normal(mean=0, std=1, size=p.data.size(), dtype=p.data.dtype)
                        p.data = p.data - 1e-6 * (g * z + 0.0 * p.data)
                times.append(time.perf_counter() - t0)
        else:
            hf.train()
            opt = torch.optim.AdamW(hf.parameters(), lr=3e-5)
            for _ in range(steps + 1):
                t0 = time.perf_counter()
                loss_fn().backward()
                opt.step()
                opt.zero_grad()
                times.append(time.perf_counter() - t0)
    else:
        model = SGLangRobertaForMaskedLM.from_pretrained(ckpt, enable_lora=case in ("c", "d"))
        clf = PromptClassifier(model, label_ids, tok.mask_token_id)
        if case == "inference":
            for _ in range(steps + 1):
                t0 = time.perf_counter()
                clf.label_logits(batch["input_ids"], batch["attention_mask"])
                times.append(time.perf_counter() - t0)
        else:
            if case in ("c", "d"):
                from peft import LoraConfig

                lora = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])
                model.add_adapter(lora, adapter_name="task")
            args = MeZOTrainingArguments(output_dir="/tmp/bench-mezo", learning_rate=1e-6, zo_eps=1e-3, report_to=[],
                                         use_cpu=True, remove_unused_columns=False,
                                         zo_trainable="all" if case == "b" else "lora", zo_paired_batch=case == "d")
            trainer = MeZOTrainer(model=clf, args=args)
            for _ in range(steps + 1):
                t0 = time.perf_counter()
                trainer.training_step(clf, dict(batch))
                times.append(time.perf_counter() - t0)
        model.close()
    steady = sorted(times[1:])  # first step warms up
    return {"case": case, "what": CASES[case], "seconds_per_step": steady[len(steady) // 2],
            "peak_rss_mib": peak_rss_mib()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "mezo.json")
    args = ap.parse_args()
    if args.case:
        print("RESULT " + json.dumps(run_case(args.case, args.steps)), flush=True)
        return
    roberta_base_checkpoint()
    rows = []
    for case in CASES:
        r = subprocess.run([sys.executable, __file__, "--case", case, "--steps", str(args.steps)],
                           capture_output=True, text=True, cwd=str(REPO))
        line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
        if r.returncode or not line:
            raise SystemExit(f"case {case} failed:\n{r.stderr[-3000:]}")
        rows.append(json.loads(line[0][7:]))
        print(f"{case}: {rows[-1]['seconds_per_step']:.2f} s/step, peak {rows[-1]['peak_rss_mib']:.0f} MiB", flush=True)
    by = {r["case"]: r for r in rows}
    for r in rows:
        r["speedup_vs_a"] = by["a"]["seconds_per_step"] / r["seconds_per_step"]
        r["memory_vs_engine_inference"] = r["peak_rss_mib"] / by["inference"]["peak_rss_mib"]
    report(f"bench_mezo: 64 prompts (k=512 split), roberta-base shape, CPU, {args.steps} timed steps", rows,
           ["case", "what", "seconds_per_step", "speedup_vs_a", "peak_rss_mib", "memory_vs_engine_inference"], args.out)


if __name__ == "__main__":
    main()
