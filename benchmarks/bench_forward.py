"""Forward throughput: HF eager, HF sdpa, this model's forward and compute_mlm_logits.

roberta-base shape (random weights), the 872 SST-2 test sentences as "<sentence> It was <mask>."
prompts, batches of 32 and 64, all in one run. Prints a table (sequences/s, real tokens/s, ratio
to HF sdpa) and writes JSON.

    python benchmarks/bench_forward.py                 # full run (~10 min on 2 CPU cores)
    python benchmarks/bench_forward.py --limit 128     # quick look
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, TOKENIZER_DIR, prompts, report, roberta_base_checkpoint, time_it  # noqa: E402


def batches(tokenizer, texts, batch_size):
    return [tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True)
            for i in range(0, len(texts), batch_size)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N sentences (0 = all 872)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the SGLang model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "forward.json")
    args = ap.parse_args()

    from transformers import AutoTokenizer, RobertaForMaskedLM

    from sglang_hf_bridge import SGLangRobertaForMaskedLM

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    texts = prompts(args.limit)
    ckpt = roberta_base_checkpoint()
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)

    hf_eager = RobertaForMaskedLM.from_pretrained(ckpt, attn_implementation="eager").eval().to(device)
    hf_sdpa = RobertaForMaskedLM.from_pretrained(ckpt, attn_implementation="sdpa").eval().to(device)
    ours = SGLangRobertaForMaskedLM.from_pretrained(ckpt, device=args.device, tp_size=args.tp)
    label_ids = [tok.convert_tokens_to_ids(t) for t in ("Ġgreat", "Ġterrible")]

    rows = []
    for bs in args.batch_sizes:
        data = [{k: v.to(device) for k, v in b.items()} for b in batches(tok, texts, bs)]
        real_tokens = sum(int(b["attention_mask"].sum()) for b in data)
        padded_tokens = sum(b["input_ids"].numel() for b in data)

        def run_hf(model):
            def go():
                with torch.inference_mode():
                    for b in data:
                        model(**b).logits
                sync()
            return go

        def run_forward():
            with torch.inference_mode():
                for b in data:
                    ours(**b).logits
            sync()

        def run_mlm():
            for b in data:
                ours.compute_mlm_logits(b["input_ids"], b["attention_mask"], mask_token_id=tok.mask_token_id)
            sync()

        def run_mlm_labels():
            for b in data:
                ours.compute_mlm_logits(b["input_ids"], b["attention_mask"], mask_token_id=tok.mask_token_id,
                                        vocab_ids=label_ids)
            sync()

        timings = {}
        for name, fn in [("hf_eager", run_hf(hf_eager)), ("hf_sdpa", run_hf(hf_sdpa)), ("sglang_forward", run_forward),
                         ("sglang_compute_mlm_logits", run_mlm),
                         ("sglang_compute_mlm_logits_label_words", run_mlm_labels)]:
            gc.collect()
            timings[name] = time_it(fn, repeats=1, warmup=0 if len(data) > 4 else 1)
            print(f"bs={bs} {name}: {timings[name]:.2f} s", flush=True)
        for name, seconds in timings.items():
            rows.append({
                "batch_size": bs,
                "method": name,
                "seconds": seconds,
                "sequences_per_s": len(texts) / seconds,
                "real_tokens_per_s": real_tokens / seconds,
                "vs_hf_sdpa": timings["hf_sdpa"] / seconds,
                "padding_fraction": 1 - real_tokens / padded_tokens,
            })
    ours.close()
    report(
        f"bench_forward: {len(texts)} SST-2 prompts, roberta-base shape, device={args.device}, tp={args.tp}",
        rows,
        ["batch_size", "method", "seconds", "sequences_per_s", "real_tokens_per_s", "vs_hf_sdpa", "padding_fraction"],
        args.out,
    )


if __name__ == "__main__":
    main()
