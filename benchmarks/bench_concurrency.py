"""Many callers, one engine: throughput of N threads each sending batch-1 prompts to ONE model,
against one caller sending the same prompts one at a time (serial) and in batches of 8 -- and
transformers' own model one prompt at a time, all in one run. Every answer is checked against
the single-threaded one.

roberta-base shape (random weights), SST-2 test sentences as "<sentence> It was <mask>." prompts,
``compute_mlm_logits`` on the two label words. Target (issue 12): 8 threads reach >= 85% of the
batch-of-8 caller's throughput.

    python benchmarks/bench_concurrency.py                  # 128 prompts, threads 1 2 4 8
    python benchmarks/bench_concurrency.py --limit 64 --threads 1 8
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, TOKENIZER_DIR, prompts, report, roberta_base_checkpoint  # noqa: E402

LABEL_WORDS = [6587, 372]  # " terrible", " great"


@torch.no_grad()
def time_transformers(hf, singles, mask_id) -> float:
    def one(enc):
        hidden = hf.roberta(**enc)[0]
        return hf.lm_head(hidden[enc["input_ids"] == mask_id])[:, LABEL_WORDS]

    one(singles[0])
    t0 = time.perf_counter()
    for enc in singles:
        one(enc)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=128)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "concurrency.json")
    args = ap.parse_args()

    from transformers import AutoTokenizer, RobertaForMaskedLM

    from sglang_hf_bridge import SGLangRobertaForMaskedLM

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    texts = prompts(args.limit)
    singles = [tokenizer([t], return_tensors="pt") for t in texts]
    path = roberta_base_checkpoint()
    rows = []

    hf_seconds = time_transformers(RobertaForMaskedLM.from_pretrained(path, attn_implementation="sdpa").eval(),
                                   singles, tokenizer.mask_token_id)
    rows.append({"caller": "transformers sdpa, one prompt at a time (LM head at the mask)", "threads": 1,
                 "seconds": hf_seconds})

    with SGLangRobertaForMaskedLM.from_pretrained(path) as model:
        def one(enc):
            return model.compute_mlm_logits(enc["input_ids"], enc["attention_mask"], vocab_ids=LABEL_WORDS)

        one(singles[0])
        t0 = time.perf_counter()
        oracle = [one(enc) for enc in singles]
        serial = time.perf_counter() - t0
        rows.append({"caller": "engine, one caller, batch 1 (serial)", "threads": 1, "seconds": serial})

        batched = [tokenizer(texts[i : i + 8], return_tensors="pt", padding=True) for i in range(0, len(texts), 8)]
        t0 = time.perf_counter()
        for enc in batched:
            one(enc)
        batch8 = time.perf_counter() - t0
        rows.append({"caller": "engine, one caller, batches of 8", "threads": 1, "seconds": batch8})

        worst = 0.0
        for n in args.threads:
            results = [None] * len(texts)
            before = (model.runtime.batcher.passes, model.runtime.batcher.merged_calls)

            def worker(k):
                for i in range(k, len(texts), n):
                    results[i] = one(singles[i])

            threads = [threading.Thread(target=worker, args=(k,)) for k in range(n)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seconds = time.perf_counter() - t0
            worst = max(worst, max((a - b).abs().max().item() for a, b in zip(results, oracle)))
            passes = model.runtime.batcher.passes - before[0]
            rows.append({"caller": f"engine, {n} threads, batch 1 each", "threads": n, "seconds": seconds,
                         "engine passes": passes, "prompts/pass": len(texts) / passes})
        assert model.engine_pool_stats() == model.engine_pool_capacity()

    for r in rows:
        r.setdefault("prompts/s", len(texts) / r["seconds"])
        r.setdefault("ms/prompt", 1e3 * r["seconds"] / len(texts))
        r["vs serial"] = serial / r["seconds"]
        r["vs batches of 8"] = batch8 / r["seconds"]
    report(f"Concurrent callers, {len(texts)} prompts, roberta-base shape, compute_mlm_logits on 2 label words "
           f"(max |threaded - serial| = {worst:.2e})",
           rows, ["caller", "seconds", "prompts/s", "ms/prompt", "engine passes", "prompts/pass", "vs serial",
                  "vs batches of 8"], args.out, extra={"max_abs_diff_vs_serial": worst})


if __name__ == "__main__":
    main()
