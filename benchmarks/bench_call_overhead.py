"""Per-call overhead of the engine: where the time of one small ``compute_mlm_logits`` call goes,
measured on a model so small (2 layers, hidden 64, the real 50k vocabulary) that compute is
negligible, next to transformers' whole call on the same weights.

Timers wrap the stages of a call (SGLang batch building, ``ModelRunner.forward``, the model's
layers, the LM head, giving slots back); "overhead" is the call minus the model's layers and the
LM head: what the engine adds on the way to and from SGLang. Median of ``--calls`` calls.

    python benchmarks/bench_call_overhead.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, report, tiny_checkpoint  # noqa: E402

STAGES = ["batch building (SGLang ScheduleBatch, ForwardBatch, slots)", "ModelRunner.forward",
          "  of which the model's layers", "LM head", "giving slots back", "whole call"]


def _timed(obj, name: str, label: str, times):
    """Wrap ``obj.name`` with a timer; returns the original (to put back)."""
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            times[label].append(time.perf_counter() - start)

    setattr(obj, name, wrapper)
    return original


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--tokens", type=int, default=24, help="prompt length, <s> and </s> included")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "call_overhead.json")
    args = ap.parse_args()
    from transformers import RobertaForMaskedLM

    from sglang_hf_bridge import SGLangRobertaForMaskedLM
    from sglang_hf_bridge.engine import batch as batch_module

    path = tiny_checkpoint()
    hf = RobertaForMaskedLM.from_pretrained(path).eval()
    vocab = hf.config.vocab_size
    mask_id = vocab - 1
    ids = torch.tensor([[0] + [5 + i for i in range(args.tokens - 3)] + [mask_id, 2]])

    def hf_call():
        with torch.inference_mode():
            hidden = hf.roberta(ids)[0]
            hf.lm_head(hidden[ids == mask_id])

    rows = []
    for lora in (True, False):
        times = defaultdict(list)
        with SGLangRobertaForMaskedLM.from_pretrained(path, enable_lora=lora) as model:
            runner = model.runtime.model_runner
            for _ in range(30):  # warm-up, before the timers
                model.compute_mlm_logits(ids, mask_token_id=mask_id)
                hf_call()
            batch_class = batch_module.ExtendBatch
            originals = {name: getattr(batch_class, name) for name in ("prepare", "release")}
            _timed(batch_class, "prepare", STAGES[0], times)
            _timed(runner, "forward", STAGES[1], times)
            _timed(runner.model, "forward", STAGES[2], times)
            _timed(runner.model, "compute_logits", STAGES[3], times)
            _timed(batch_class, "release", STAGES[4], times)
            try:
                hf_times = []
                for _ in range(args.calls):
                    start = time.perf_counter()
                    model.compute_mlm_logits(ids, mask_token_id=mask_id)
                    times[STAGES[5]].append(time.perf_counter() - start)
                    start = time.perf_counter()
                    hf_call()
                    hf_times.append(time.perf_counter() - start)
            finally:
                for name, original in originals.items():
                    setattr(batch_class, name, original)
        ms = {label: 1000 * statistics.median(v) for label, v in times.items()}
        overhead = ms[STAGES[5]] - ms[STAGES[2]] - ms[STAGES[3]]
        for label in STAGES:
            rows.append({"enable_lora": lora, "stage": label, "ms_per_call": ms[label]})
        rows.append({"enable_lora": lora, "stage": "OVERHEAD = whole call - layers - LM head", "ms_per_call": overhead})
        rows.append({"enable_lora": lora, "stage": "transformers' whole call (same weights)",
                     "ms_per_call": 1000 * statistics.median(hf_times)})
    report(f"bench_call_overhead: one {args.tokens}-token prompt, 2 layers, hidden 64, median of {args.calls} calls",
           rows, ["enable_lora", "stage", "ms_per_call"], args.out)


if __name__ == "__main__":
    main()
