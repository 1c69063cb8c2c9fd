"""One command that checks a device: parity, LoRA, MeZO, caches, tensor parallelism and speed against transformers.

    python benchmarks/device_check.py --device cuda --out device_check.json   # on whatever GPU is at hand
    python benchmarks/device_check.py --device cpu --smoke                      # tiny model, < 90 s (CI runs it)

Checks (each one a row of the table; the JSON has them all, with the environment):

  parity     forward logits (every position), loss and compute_mlm_logits against transformers on
             the same weights and device, in float32, bfloat16 and float16. float32: max abs error
             <= FP32_TOL[device] x max(1, max|ref|). Half precision: the rule of
             tests/test_half_precision.py -- the engine's error against transformers float32 at most
             transformers' own error in that dtype x 1.5 (mean) / x 2 (max) + 1 ulp, top-1 agreement
             at least transformers' - max(0.05, 1/N).
  lora       a PEFT adapter in a mixed batch (adapter rows and base rows) against PEFT on
             transformers (same dtype, adapter weights in the model dtype), same rules.
  caches     result cache and frozen-layer cache: served answers bitwise equal to the fresh ones.
  mezo       MeZOTrainer, full parameters, 2 steps on the engine and on transformers with the same
             seeds and batches: projected gradients and weights after the steps agree (float32).
  tp         parity at tp_size=2 (float32 and bfloat16) where two devices are available
             (two GPUs; on CPU two ranks share the cores; skipped by --smoke).
  speed      sequences/s on SST-2 prompts: transformers sdpa (full logits), transformers sdpa with the
             LM head at the mask (length-sorted batches: its strongest setting), this model's forward
             and compute_mlm_logits, per dtype (float16 is not timed on CPU: torch's CPU float16 matmul
             is a reference kernel there).

On CUDA the script sets TRITON_F32_DEFAULT=ieee (unless --allow-tf32 or the variable is set):
SGLang's triton attention and LoRA kernels otherwise run float32 dots in TF32, which is a
different function from transformers' float32 (see docs/devices.md). Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

# Before torch/triton are imported: whether triton's float32 dots use TF32 is read from the environment.
if "--allow-tf32" not in sys.argv and "cuda" in " ".join(sys.argv):
    os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    REPO,
    SST2_SPLITS,
    TOKENIZER_DIR,
    environment,
    prompts,
    roberta_base_checkpoint,
    tiny_checkpoint,
)
from accuracy_rule import PROBE_LABEL_WORDS, PROBE_TEXTS, half_precision_bounds, measure  # noqa: E402

FP32_TOL = {"cpu": 1e-5, "cuda": 1e-4}  # x max(1, max|ref|); CUDA's is a starting point (not measured here)
TEXTS, LABEL_WORDS = PROBE_TEXTS, PROBE_LABEL_WORDS  # the prompts the half-precision rule was measured on


# ---------------------------------------------------------------- accuracy rules
def accuracy_rows(check, dtype, tp, what, ours, theirs, ref, device):
    """Rows for one comparison: float32 -> absolute tolerance against ``ref``; half -> the project's
    half-precision rule (``benchmarks/accuracy_rule.py``, the one the tests assert)."""
    name = str(dtype).replace("torch.", "")
    if dtype == torch.float32:
        err = measure(ours, ref)["max"]
        limit = FP32_TOL[device] * max(1.0, ref.detach().float().abs().max().item())
        return [row(check, name, tp, f"{what}: max abs err vs transformers", err, limit, err <= limit)]
    bounds, _, _ = half_precision_bounds(ours, theirs, ref, dtype)
    labels = {"max": "max abs err vs fp32", "mean": "mean abs err vs fp32", "top1": "top-1 agreement with fp32",
              "top5": "top-5 overlap with fp32"}
    return [row(check, name, tp, f"{what}: {labels[b.stat]} (transformers {b.theirs:.3g})", b.ours, b.limit, b.ok,
                higher_is_better=b.higher_is_better) for b in bounds]


def row(check, dtype, tp, metric, value, limit=None, ok=True, higher_is_better=False, **extra):
    r = {"check": check, "dtype": dtype, "tp": tp, "metric": metric, "value": value, "limit": limit,
         "ok": bool(ok), "higher_is_better": higher_is_better}
    r.update(extra)
    return r


# ---------------------------------------------------------------- the model under test
class Context:
    def __init__(self, args):
        from transformers import AutoTokenizer

        self.args, self.device = args, args.device
        self.tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
        self.ckpt = tiny_checkpoint() if args.smoke else roberta_base_checkpoint()
        self.enc = dict(self.tok(TEXTS, return_tensors="pt", padding=True))
        self.hf = {}

    def hf_model(self, dtype):
        from transformers import RobertaForMaskedLM

        if dtype not in self.hf:
            self.hf[dtype] = RobertaForMaskedLM.from_pretrained(self.ckpt, dtype=dtype,
                                                                attn_implementation="sdpa").eval().to(self.device)
        return self.hf[dtype]

    def on_device(self, batch):
        return {k: v.to(self.device) for k, v in batch.items()}

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()


# ---------------------------------------------------------------- checks
def check_parity(ctx, model, dtype, tp):
    enc, labels = ctx.enc, ctx.enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    with torch.no_grad():
        ref = ctx.hf_model(torch.float32)(**ctx.on_device(enc), labels=labels.to(ctx.device))
        theirs = ctx.hf_model(dtype)(**ctx.on_device(enc), labels=labels.to(ctx.device))
    out = model(**enc, labels=labels)
    rows = [row("parity", str(dtype).replace("torch.", ""), tp, "logits dtype", str(out.logits.dtype),
                str(dtype), out.logits.dtype == dtype)]
    rows += accuracy_rows("parity", dtype, tp, "forward logits", out.logits, theirs.logits, ref.logits, ctx.device)
    rows += accuracy_rows("parity", dtype, tp, "loss", out.loss, theirs.loss, ref.loss, ctx.device)
    at_mask = enc["input_ids"] == ctx.tok.mask_token_id
    cm = model.compute_mlm_logits(enc["input_ids"], enc["attention_mask"])
    rows += accuracy_rows("parity", dtype, tp, "compute_mlm_logits", cm, theirs.logits[at_mask.to(ctx.device)],
                          ref.logits[at_mask.to(ctx.device)], ctx.device)
    return rows


def check_lora(ctx, model, dtype, tp):
    from peft import LoraConfig, PeftModel, get_peft_model

    directory = Path(tempfile.mkdtemp(prefix="device-check-lora-"))
    torch.manual_seed(3)
    hf32 = ctx.hf_model(torch.float32)
    peft32 = get_peft_model(copy.deepcopy(hf32), LoraConfig(
        r=8, lora_alpha=16, target_modules=["query", "value", "intermediate.dense"], init_lora_weights=False)).eval()
    peft32.save_pretrained(directory)
    peft_same = (peft32 if dtype == torch.float32 else PeftModel.from_pretrained(
        copy.deepcopy(ctx.hf_model(dtype)), directory, autocast_adapter_dtype=False).eval())
    model.load_adapter(directory, adapter_name="device-check")
    try:
        names = ["device-check", "__base__"] * (len(TEXTS) // 2)
        use = torch.tensor([n != "__base__" for n in names], device=ctx.device).view(-1, 1, 1)
        enc = ctx.on_device(ctx.enc)
        with torch.no_grad():
            ref = torch.where(use, peft32(**enc).logits, hf32(**enc).logits)
            theirs = torch.where(use, peft_same(**enc).logits, ctx.hf_model(dtype)(**enc).logits)
        out = model(**ctx.enc, adapter_names=names).logits
        return accuracy_rows("lora", dtype, tp, "mixed batch vs PEFT", out, theirs, ref, ctx.device)
    finally:
        model.delete_adapter("device-check")


def check_caches(ctx, model, dtype, tp):
    name, enc = str(dtype).replace("torch.", ""), ctx.enc
    ids, mask = enc["input_ids"], enc["attention_mask"]
    fresh = model(**enc).logits, model.compute_mlm_logits(ids, mask, vocab_ids=LABEL_WORDS)
    model.enable_result_cache(64)
    try:
        model(**enc), model.compute_mlm_logits(ids, mask, vocab_ids=LABEL_WORDS)
        served = model(**enc).logits, model.compute_mlm_logits(ids, mask, vocab_ids=LABEL_WORDS)
        hits = model.cache_stats()["result"]["hits"]
    finally:
        model.disable_result_cache()
    same = all(torch.equal(a, b) for a, b in zip(fresh, served))
    rows = [row("caches", name, tp, "result cache: served == fresh (bitwise)", same, True, same and hits > 0,
                hits=hits)]
    model.enable_frozen_layer_cache(1)
    try:
        model(**enc)
        served_frozen = model(**enc).logits
        hits = model.cache_stats()["frozen_layer"]["hits"]
    finally:
        model.disable_frozen_layer_cache()
    same = torch.equal(served_frozen, fresh[0])
    rows.append(row("caches", name, tp, "frozen-layer cache: served == fresh (bitwise)", same, True,
                    same and hits > 0, hits=hits))
    return rows


def check_mezo(ctx):
    from sglang_hf_bridge import SGLangRobertaForMaskedLM
    from sglang_hf_bridge.training import (
        MeZOTrainer,
        MeZOTrainingArguments,
        PromptClassifier,
        PromptCollator,
        PromptTemplate,
        load_lmbff_tsv,
    )

    template = PromptTemplate()
    label_ids = template.label_word_ids(ctx.tok)
    rows_ = load_lmbff_tsv(SST2_SPLITS / "16-42" / "train.tsv")[:16]

    def train(model, out):
        args = MeZOTrainingArguments(output_dir=out, per_device_train_batch_size=8, max_steps=2, learning_rate=1e-3,
                                     lr_scheduler_type="constant", zo_eps=1e-3, zo_trainable="all", seed=42,
                                     report_to=[], save_strategy="no", logging_steps=1,
                                     use_cpu=ctx.device == "cpu", remove_unused_columns=False)
        trainer = MeZOTrainer(model=PromptClassifier(model, label_ids, ctx.tok.mask_token_id), args=args,
                              train_dataset=rows_, data_collator=PromptCollator(ctx.tok, template))
        trainer.train()
        return [h["projected_grads"][0] for h in trainer.zo_history]

    from transformers import RobertaForMaskedLM

    hf = RobertaForMaskedLM.from_pretrained(ctx.ckpt, attn_implementation="sdpa").eval().to(ctx.device)
    start = {k: v.detach().float().cpu().clone() for k, v in hf.state_dict().items()}
    with tempfile.TemporaryDirectory() as out:
        g_hf = train(hf, out)
    after_hf = {k: v.detach().float().cpu() for k, v in hf.state_dict().items()}
    with SGLangRobertaForMaskedLM.from_pretrained(ctx.ckpt, device=ctx.device, enable_lora=False) as model:
        with tempfile.TemporaryDirectory() as out:
            g_ours = train(model, out)
        after_ours = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    keys = [k for k in after_ours if k in after_hf and after_hf[k].shape == after_ours[k].shape]
    moved = max((after_hf[k] - start[k]).abs().max().item() for k in keys)
    diff = max((after_hf[k] - after_ours[k]).abs().max().item() for k in keys)
    g_diff = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(g_ours, g_hf))
    return [
        row("mezo", "float32", 1, f"projected gradients, rel. diff (engine {g_ours}, transformers {g_hf})", g_diff,
            1e-2, g_diff <= 1e-2 and len(g_ours) == len(g_hf) == 2),
        row("mezo", "float32", 1, f"weights after 2 steps: max abs diff ({len(keys)} tensors; moved {moved:.2e})",
            diff, 0.01 * moved + 1e-6, diff <= 0.01 * moved + 1e-6 and moved > 0),
    ]


def check_speed(ctx, model, dtype, tp):
    """Sequences/s on SST-2 prompts for transformers sdpa (full logits, and LM head at the mask on length-sorted
    batches) and the engine (forward, compute_mlm_logits)."""
    name = str(dtype).replace("torch.", "")
    texts = prompts(ctx.args.limit)
    bs = ctx.args.batch_size
    batches = [ctx.tok(texts[i:i + bs], return_tensors="pt", padding=True) for i in range(0, len(texts), bs)]
    lengths = [len(x) for x in ctx.tok(texts)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    sorted_batches = [ctx.tok([texts[i] for i in order[s:s + bs]], return_tensors="pt", padding=True)
                      for s in range(0, len(texts), bs)]
    on_dev = [ctx.on_device(b) for b in batches]
    on_dev_sorted = [ctx.on_device(b) for b in sorted_batches]
    hf, mask_id = ctx.hf_model(dtype), ctx.tok.mask_token_id

    def hf_full():
        with torch.inference_mode():
            for b in on_dev:
                hf(**b).logits

    def hf_mask():
        with torch.inference_mode():
            for b in on_dev_sorted:
                h = hf.roberta(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
                hf.lm_head(h[b["input_ids"] == mask_id])

    def ours_forward():
        with torch.inference_mode():
            for b in batches:
                model(**b).logits

    def ours_mlm():
        for b in batches:
            model.compute_mlm_logits(b["input_ids"], b["attention_mask"], mask_token_id=mask_id)

    timings = {}
    for method, fn in [("transformers sdpa", hf_full), ("transformers sdpa, head at mask, sorted", hf_mask),
                       ("engine forward", ours_forward), ("engine compute_mlm_logits", ours_mlm)]:
        fn()  # warm-up (kernel compilation on CUDA)
        ctx.sync()
        t0 = time.perf_counter()
        fn()
        ctx.sync()
        timings[method] = time.perf_counter() - t0
    base = timings["transformers sdpa"]
    return [row("speed", name, tp, f"{method}: sequences/s ({len(texts)} prompts, batch {bs}; "
                f"{base / seconds:.2f}x transformers sdpa)", len(texts) / seconds, None, True,
                vs_hf_sdpa=base / seconds, seconds=seconds) for method, seconds in timings.items()]


# ---------------------------------------------------------------- driver
def guarded(rows, what, fn, *args):
    """Run one check; an exception becomes a failed row (the other checks still run)."""
    try:
        rows += fn(*args)
    except Exception as e:  # noqa: BLE001 - reported in the table and the JSON
        traceback.print_exc()
        rows.append(row(what[0], what[1], what[2], f"raised {type(e).__name__}: {str(e)[:200]}", None, None, False))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--smoke", action="store_true", help="tiny model, few prompts, no tp=2 (CI)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"],
                    choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--tp-sizes", type=int, nargs="+", default=None,
                    help="default: 1, and 2 where two GPUs are visible (on CPU without --smoke too)")
    ap.add_argument("--limit", type=int, default=None, help="prompts timed in the speed rows (default 512; smoke 16)")
    ap.add_argument("--batch-size", type=int, default=None, help="speed rows' batch size (default 64; smoke 8)")
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=["parity", "lora", "caches", "mezo", "tp", "speed", "attention"])
    ap.add_argument("--allow-tf32", action="store_true", help="on CUDA, leave triton's float32 dots in TF32")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "device_check.json")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible to torch", file=sys.stderr)
        return 2
    args.limit = args.limit if args.limit is not None else (16 if args.smoke else 512)
    args.batch_size = args.batch_size or (8 if args.smoke else 64)
    if args.tp_sizes is None:
        two = torch.cuda.device_count() >= 2 if args.device == "cuda" else not args.smoke
        args.tp_sizes = [1, 2] if two else [1]

    from sglang_hf_bridge import SGLangRobertaForMaskedLM

    t_start = time.perf_counter()
    ctx = Context(args)
    rows = []
    for name in args.dtypes:
        dtype = getattr(torch, name)
        try:
            model = SGLangRobertaForMaskedLM.from_pretrained(ctx.ckpt, device=args.device, dtype=dtype)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            rows.append(row("load", name, 1, f"from_pretrained raised {type(e).__name__}: {str(e)[:200]}",
                            None, None, False))
            continue
        with model:
            for check, fn in [("parity", check_parity), ("lora", check_lora), ("caches", check_caches)]:
                if check not in args.skip:
                    guarded(rows, (check, name, 1), fn, ctx, model, dtype, 1)
            if "speed" not in args.skip and not (dtype == torch.float16 and args.device == "cpu"):
                guarded(rows, ("speed", name, 1), check_speed, ctx, model, dtype, 1)
        if dtype != torch.float32:
            ctx.hf.pop(dtype, None)  # keep memory for the next dtype; float32 is the reference of every check
    if "attention" not in args.skip and "float32" in args.dtypes:
        # The attention path the device does not use by default (CPU: "sdpa", CUDA: SGLang's backend).
        other = "backend" if args.device == "cpu" else "sdpa"

        def other_attention():
            with SGLangRobertaForMaskedLM.from_pretrained(ctx.ckpt, device=args.device, dtype=torch.float32,
                                                          encoder_attention=other) as model:
                return [dict(r, check=f"parity, encoder_attention={other}") for r in
                        check_parity(ctx, model, torch.float32, 1)]

        guarded(rows, ("attention", "float32", 1), other_attention)
    if "mezo" not in args.skip:
        guarded(rows, ("mezo", "float32", 1), check_mezo, ctx)
    if "tp" not in args.skip:
        for tp in [t for t in args.tp_sizes if t > 1]:
            for name in [d for d in args.dtypes if d in ("float32", "bfloat16")]:
                dtype = getattr(torch, name)

                def tp_parity(dtype=dtype, tp=tp):
                    with SGLangRobertaForMaskedLM.from_pretrained(ctx.ckpt, device=args.device, dtype=dtype,
                                                                  tp_size=tp) as model:
                        return check_parity(ctx, model, dtype, tp)

                guarded(rows, ("tp", name, tp), tp_parity)

    ok = all(r["ok"] for r in rows)
    print_table(rows, args, ok)
    payload = {"device": args.device, "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else
               "cpu", "smoke": args.smoke, "checkpoint": str(ctx.ckpt), "ok": ok,
               "seconds": time.perf_counter() - t_start, "environment": environment(),
               "triton_f32_default": os.environ.get("TRITON_F32_DEFAULT"), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0 if ok else 1


def print_table(rows, args, ok):
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4f}"
        return "" if v is None else str(v)

    cols = ["check", "dtype", "tp", "metric", "value", "limit", "ok"]
    table = [[fmt(r[c]) if c != "limit" or r[c] is None else ("<= " if not r["higher_is_better"] else ">= ")
              + fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    print(f"\ndevice_check: device={args.device} smoke={args.smoke} -> {'ALL OK' if ok else 'FAILED'}")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for t in table:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)))


if __name__ == "__main__":
    sys.exit(main())
