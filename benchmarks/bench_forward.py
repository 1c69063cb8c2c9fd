"""Forward throughput: HF eager, HF sdpa, HF's strongest setting, this model's forward and compute_mlm_logits.

roberta-base shape (random weights), the 872 SST-2 test sentences as "<sentence> It was <mask>."
prompts, batches of 32 and 64, float32 and bfloat16, all in one run. Prints a table (sequences/s,
real tokens/s, ratio to HF sdpa and to HF's strongest setting) and writes JSON. Methods are timed
batch by batch in turn (each batch by every method before the next batch), so load from other
processes slows them alike; --repeats N keeps the best of N runs per batch.

Rows per dtype and batch size:
  hf_eager, hf_sdpa                   transformers' RobertaForMaskedLM, full [B, T, V] logits, batches in data order
  hf_sdpa_mask_head_sorted            transformers' strongest baseline for the same answers: sdpa encoder,
                                      LM head only at the <mask> positions, batches of length-sorted prompts
  sglang_forward                      this model's forward (full logits, like hf_sdpa)
  sglang_compute_mlm_logits           logits at the masks (the same answers as hf_sdpa_mask_head_sorted)
  sglang_compute_mlm_logits_label_words   the same, two label words only

--latency adds batch-1 and batch-8 latency rows (ms per call, median of --latency-calls calls,
the methods' calls interleaved): transformers (sdpa, LM head at the mask) and compute_mlm_logits on
engines with enable_lora=True and enable_lora=False.

    python benchmarks/bench_forward.py                          # full run (float32 + bfloat16, ~25 min on 2 CPU cores)
    python benchmarks/bench_forward.py --limit 128              # quick look
    python benchmarks/bench_forward.py --dtypes float32 --latency
    python benchmarks/bench_forward.py --batch-sizes --latency    # latency rows only
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, TOKENIZER_DIR, environment, prompts, report, roberta_base_checkpoint  # noqa: E402

LATENCY_BATCHES = (1, 8)


def batches(tokenizer, texts, batch_size):
    return [tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True)
            for i in range(0, len(texts), batch_size)]


def sorted_batches(tokenizer, texts, batch_size):
    """Length-sorted batches (what a tuned transformers job does: least padding)."""
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    return batches(tokenizer, [texts[i] for i in order], batch_size)


def hf_mask_head(model, batch, mask_token_id):
    """transformers' encoder, then the LM head only at the <mask> positions ([N, V])."""
    hidden = model.roberta(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return model.lm_head(hidden[batch["input_ids"] == mask_token_id])


def print_table(title, rows, columns):
    fmt = lambda v: "" if v is None else (f"{v:.3f}" if isinstance(v, float) and abs(v) < 100  # noqa: E731
                                          else f"{v:.1f}" if isinstance(v, float) else str(v))
    widths = [max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in columns]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def interleaved_timings(methods, n_batches: int, repeats: int, sync) -> dict:
    """Seconds per method over all batches, timed batch by batch with every method in turn (the best
    of ``repeats`` runs per batch): on a machine that other work slows down now and then, every method
    sees the same slowdowns. The first batch is run once untimed by each method (warm-up)."""
    for fn in methods.values():
        fn(0)
    sync()
    total = dict.fromkeys(methods, 0.0)
    for i in range(n_batches):
        for name, fn in methods.items():
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn(i)
                sync()
                best = min(best, time.perf_counter() - t0)
            total[name] += best
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N sentences (0 = all 872)")
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=[32, 64],
                    help="throughput batch sizes (none: latency rows only, with --latency)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                    choices=["float32", "bfloat16", "float16"], help="dtypes measured, each with its own HF baseline")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the SGLang model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--latency", action="store_true", help="add batch-1 and batch-8 latency rows")
    ap.add_argument("--latency-calls", type=int, default=20, help="calls per latency row (median reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per batch and method; the best is kept")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "forward.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer, RobertaForMaskedLM

    from sglang_hf_bridge import SGLangRobertaForMaskedLM

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    texts = prompts(args.limit)
    ckpt = roberta_base_checkpoint()
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    label_ids = [tok.convert_tokens_to_ids(t) for t in ("Ġgreat", "Ġterrible")]
    mask_id = tok.mask_token_id

    rows, latency_rows = [], []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        hf_eager = RobertaForMaskedLM.from_pretrained(ckpt, attn_implementation="eager", dtype=dtype).eval().to(device)
        hf_sdpa = RobertaForMaskedLM.from_pretrained(ckpt, attn_implementation="sdpa", dtype=dtype).eval().to(device)
        ours = SGLangRobertaForMaskedLM.from_pretrained(ckpt, device=args.device, tp_size=args.tp, dtype=dtype)
        for bs in args.batch_sizes:
            data = [{k: v.to(device) for k, v in b.items()} for b in batches(tok, texts, bs)]
            data_sorted = [{k: v.to(device) for k, v in b.items()} for b in sorted_batches(tok, texts, bs)]
            real_tokens = sum(int(b["attention_mask"].sum()) for b in data)
            padded = {"data": sum(b["input_ids"].numel() for b in data),
                      "sorted": sum(b["input_ids"].numel() for b in data_sorted)}

            with torch.inference_mode():
                methods = {
                    "hf_eager": lambda i: hf_eager(**data[i]).logits,
                    "hf_sdpa": lambda i: hf_sdpa(**data[i]).logits,
                    "hf_sdpa_mask_head_sorted": lambda i: hf_mask_head(hf_sdpa, data_sorted[i], mask_id),
                    "sglang_forward": lambda i: ours(**data[i]).logits,
                    "sglang_compute_mlm_logits": lambda i: ours.compute_mlm_logits(
                        data[i]["input_ids"], data[i]["attention_mask"], mask_token_id=mask_id),
                    "sglang_compute_mlm_logits_label_words": lambda i: ours.compute_mlm_logits(
                        data[i]["input_ids"], data[i]["attention_mask"], mask_token_id=mask_id, vocab_ids=label_ids),
                }
                timings = interleaved_timings(methods, len(data), args.repeats, sync)
            for name, seconds in timings.items():
                print(f"{dtype_name} bs={bs} {name}: {seconds:.2f} s", flush=True)
            for name, seconds in timings.items():
                rows.append({
                    "dtype": dtype_name,
                    "batch_size": bs,
                    "method": name,
                    "seconds": seconds,
                    "sequences_per_s": len(texts) / seconds,
                    "real_tokens_per_s": real_tokens / seconds,
                    "vs_hf_sdpa": timings["hf_sdpa"] / seconds,
                    "vs_hf_best": timings["hf_sdpa_mask_head_sorted"] / seconds,
                    "padding_fraction": 1 - real_tokens / padded["sorted" if "sorted" in name else "data"],
                })
        if args.latency:
            with SGLangRobertaForMaskedLM.from_pretrained(ckpt, device=args.device, tp_size=args.tp, dtype=dtype,
                                                          enable_lora=False) as no_lora:
                latency_rows += measure_latency(args, tok, texts, dtype_name, hf_sdpa,
                                                {True: ours, False: no_lora}, device, sync)
        ours.close()
        gc.collect()

    extra = {}
    if latency_rows:
        extra["latency_rows"] = _fill_latency_ratios(latency_rows)
        print_table("latency (ms per call, median)", latency_rows, ["dtype", "batch_size", "method", "ms_per_call",
                                                                      "vs_hf"])
    title = (f"bench_forward: {len(texts)} SST-2 prompts, roberta-base shape, device={args.device}, tp={args.tp}, "
             f"dtypes={args.dtypes}, {torch.get_num_threads()} threads (engine enable_lora=True)")
    if not rows:  # latency rows only
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"title": title, "environment": environment(), "rows": [], **extra}, indent=2))
        print(f"\nwrote {args.out}")
        return
    report(
        title,
        rows,
        ["dtype", "batch_size", "method", "seconds", "sequences_per_s", "real_tokens_per_s", "vs_hf_sdpa",
         "vs_hf_best", "padding_fraction"],
        args.out,
        extra=extra,
    )


def measure_latency(args, tok, texts, dtype_name, hf_sdpa, engines, device, sync):
    """Latency rows for one dtype: transformers (LM head at the mask) and compute_mlm_logits on each
    engine of ``engines`` ({enable_lora: model}). Calls are interleaved (call i of every method, then
    call i + 1), so load from other processes slows them alike; median of ``--latency-calls``."""
    mask_id = tok.mask_token_id
    rows = []
    for bs in LATENCY_BATCHES:
        groups = [tok(texts[(i * bs) % len(texts):][:bs], return_tensors="pt", padding=True)
                  for i in range(args.latency_calls + 2)]
        groups = [{k: v.to(device) for k, v in g.items()} for g in groups]

        def hf_call(i):
            with torch.inference_mode():
                hf_mask_head(hf_sdpa, groups[i], mask_id)

        def engine_call(model):
            return lambda i: model.compute_mlm_logits(groups[i]["input_ids"], groups[i]["attention_mask"],
                                                      mask_token_id=mask_id)

        cases = {"hf_sdpa_mask_head": hf_call}
        for lora, model in engines.items():
            cases[f"sglang_compute_mlm_logits (enable_lora={lora})"] = engine_call(model)
        times = {name: [] for name in cases}
        for i in range(args.latency_calls + 2):
            for name, fn in cases.items():
                t0 = time.perf_counter()
                fn(i)
                sync()
                if i >= 2:  # two warm-up calls
                    times[name].append(time.perf_counter() - t0)
        for name, ts in times.items():
            ms = 1000 * statistics.median(ts)
            print(f"{dtype_name} latency bs={bs} {name}: {ms:.1f} ms", flush=True)
            rows.append({"dtype": dtype_name, "batch_size": bs, "method": name, "ms_per_call": ms})
    return rows


def _fill_latency_ratios(rows):
    base = {(r["dtype"], r["batch_size"]): r["ms_per_call"] for r in rows if r["method"] == "hf_sdpa_mask_head"}
    for r in rows:
        r["vs_hf"] = base.get((r["dtype"], r["batch_size"]), float("nan")) / r["ms_per_call"]
    return rows


if __name__ == "__main__":
    main()
