"""The runtimes users would pick instead: ONNX Runtime and OpenVINO against transformers and this project.

Every path computes the same answers -- the full-vocabulary logits at each "<mask>" of the SST-2
prompts -- on the same random roberta-base-shaped checkpoint, in one run:

  transformers sdpa           RobertaForMaskedLM's encoder (sdpa), LM head only at the masks
  ONNX Runtime                that encoder exported once with torch.onnx.export (hidden states out,
                              dynamic batch and length), CPUExecutionProvider, all graph optimisations
  ONNX Runtime, fused         the same file through onnxruntime.transformers.optimizer (fused attention,
                              LayerNorm, GELU; model_type "bert") when it applies
  OpenVINO f32 / bf16         the same ONNX file read by OpenVINO (INFERENCE_PRECISION_HINT f32 / bf16;
                              OpenVINO picks bf16 by itself on CPUs with AVX512-BF16 or AMX)
  this project                compute_mlm_logits (engine with enable_lora=False)

The ONNX Runtime and OpenVINO paths apply the LM head in torch at the mask rows (in the path's
precision), so the encoder is what is compared. All batches are length-sorted (least padding: the
strongest setting for the padded runtimes; the engine does not pad anyway). Each path's answers are
checked against transformers float32 (max abs error over the mask logits). A first pass over all
batches warms every path up (every shape) and collects the answers; the timed pass then runs batch
by batch with every path in turn, so load from other processes slows all paths alike.

Fraction of peak: the script measures this machine's GEMM peak per dtype itself (torch.matmul of
2048x768 @ 768x3072, best of several reps, at the start and again at the end) and each path's
achieved FLOP/s from the useful work: 2 x (encoder matmul parameters) per real token + attention
(4 x hidden x length per token and layer: QK^T and PV over the real tokens) + the LM head at the
masks (2 x (H*H + H*V) each). Padding is not counted: a padded path that computes more than that is
charged for it.

    pip install -e ".[runtimes]"                      # onnxruntime, openvino, onnx
    python benchmarks/bench_runtimes.py                # all 872 prompts, float32 + bfloat16 (~15 min, 2 CPU cores)
    python benchmarks/bench_runtimes.py --limit 128    # quick look

Paths whose package is not installed are skipped with a message; the rest still run.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, TOKENIZER_DIR, prompts, report, roberta_base_checkpoint  # noqa: E402


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def gemm_peak(dtype: torch.dtype, m: int = 2048, k: int = 768, n: int = 3072, reps: int = 8) -> float:
    """Best FLOP/s of torch.matmul [m, k] @ [k, n] in ``dtype`` on this machine."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(2):
        torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best


def useful_flops(config, lengths, n_masks: int) -> float:
    """FLOPs of the answers: encoder matmuls per real token, attention over real tokens, head at masks."""
    h, i, layers, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    per_token = 2 * layers * (4 * h * h + 2 * h * i)
    attention = sum(layers * 4 * h * n * n for n in lengths)
    head = n_masks * 2 * (h * h + h * v)
    return per_token * sum(lengths) + attention + head


class Encoder(torch.nn.Module):
    """RobertaModel's last hidden state for (input_ids, attention_mask): what gets exported."""

    def __init__(self, mlm):
        super().__init__()
        self.roberta = mlm.roberta

    def forward(self, input_ids, attention_mask):
        return self.roberta(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def export_onnx(ckpt: Path, tok) -> Path:
    """The encoder as ONNX (cached next to the checkpoint); eager attention exports cleanly."""
    from transformers import RobertaForMaskedLM

    path = Path(tempfile.gettempdir()) / f"{ckpt.name}-encoder.onnx"
    if path.exists():
        return path
    model = RobertaForMaskedLM.from_pretrained(ckpt, attn_implementation="eager").eval()
    example = tok(["A short <mask> prompt.", "A second, longer prompt with <mask> in it."], return_tensors="pt",
                  padding=True)
    axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
            "hidden": {0: "batch", 1: "tokens"}}
    tmp = path.with_suffix(".partial.onnx")
    with torch.no_grad():
        torch.onnx.export(Encoder(model).eval(), (example["input_ids"], example["attention_mask"]), str(tmp),
                          dynamo=False, input_names=["input_ids", "attention_mask"], output_names=["hidden"],
                          dynamic_axes=axes, opset_version=17)
    tmp.rename(path)
    return path


def fused_onnx(path: Path, config) -> Path:
    """onnxruntime.transformers' BERT fusions applied to ``path`` (raises if nothing fused)."""
    from onnxruntime.transformers.optimizer import optimize_model

    out = path.with_name(path.stem + "-fused.onnx")
    if not out.exists():
        opt = optimize_model(str(path), model_type="bert", num_heads=config.num_attention_heads,
                             hidden_size=config.hidden_size)
        fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
        if not any(k in fused for k in ("Attention", "MultiHeadAttention")):
            raise RuntimeError(f"the optimizer fused no attention ({fused})")
        opt.save_model_to_file(str(out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N sentences (0 = all 872)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0, help="torch/ORT/OpenVINO threads (0 = torch's default)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "runtimes.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer, RobertaForMaskedLM

    from sglang_hf_bridge import SGLangRobertaForMaskedLM

    threads = torch.get_num_threads()
    peaks = {name: gemm_peak(getattr(torch, name)) for name in ("float32", "bfloat16")}
    print("GEMM peak (torch.matmul 2048x768 @ 768x3072): "
          + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()), flush=True)

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    texts = prompts(args.limit)
    lengths = [len(ids) for ids in tok(texts)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    data = [tok([texts[i] for i in order[s : s + args.batch_size]], return_tensors="pt", padding=True)
            for s in range(0, len(texts), args.batch_size)]
    mask_id = tok.mask_token_id
    at_mask = [b["input_ids"] == mask_id for b in data]
    n_masks = sum(int(m.sum()) for m in at_mask)
    ckpt = roberta_base_checkpoint()
    hf = {"float32": RobertaForMaskedLM.from_pretrained(ckpt, attn_implementation="sdpa").eval()}
    config = hf["float32"].config
    flops = useful_flops(config, lengths, n_masks)
    padded = sum(b["input_ids"].numel() for b in data)

    with torch.inference_mode():
        reference = [hf["float32"].lm_head(Encoder(hf["float32"])(b["input_ids"], b["attention_mask"])[m])
                     for b, m in zip(data, at_mask)]

    skipped = []
    paths = []  # (path, dtype, note, fn(i) -> mask logits of batch i)

    def head_at_masks(dtype: str, hidden, i: int):
        model = hf[dtype]
        return model.lm_head(torch.as_tensor(hidden).to(model.dtype)[at_mask[i]])

    engines = []
    for dtype in args.dtypes:
        if dtype not in hf:
            hf[dtype] = RobertaForMaskedLM.from_pretrained(ckpt, attn_implementation="sdpa",
                                                           dtype=getattr(torch, dtype)).eval()
        model = hf[dtype]
        paths.append(("transformers sdpa, LM head at the mask", dtype, "",
                      lambda i, m=model: m.lm_head(Encoder(m)(**data[i])[at_mask[i]])))
        ours = SGLangRobertaForMaskedLM.from_pretrained(ckpt, dtype=dtype, enable_lora=False)
        engines.append(ours)
        paths.append(("sglang_hf_bridge compute_mlm_logits", dtype, "enable_lora=False",
                      lambda i, m=ours: m.compute_mlm_logits(data[i]["input_ids"], data[i]["attention_mask"],
                                                             mask_token_id=mask_id)))

    if not installed("onnx") or not (installed("onnxruntime") or installed("openvino")):
        skipped.append("ONNX Runtime / OpenVINO: packages not installed (pip install -e \".[runtimes]\" "
                       "installs onnxruntime, openvino, onnx)")
        onnx_path = None
    else:
        t0 = time.perf_counter()
        onnx_path = export_onnx(ckpt, tok)
        print(f"ONNX encoder: {onnx_path} ({time.perf_counter() - t0:.0f} s)", flush=True)

    feeds = [{"input_ids": b["input_ids"].numpy(), "attention_mask": b["attention_mask"].numpy()} for b in data]
    if onnx_path is not None and installed("onnxruntime") and "float32" in args.dtypes:
        import onnxruntime as ort

        def ort_session(path):
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        for name, make in [("ONNX Runtime", lambda: onnx_path),
                           ("ONNX Runtime, fused (transformers optimizer)", lambda: fused_onnx(onnx_path, config))]:
            try:
                session = ort_session(make())
            except Exception as e:  # noqa: BLE001 - a variant that does not apply is reported, not fatal
                skipped.append(f"{name}: {type(e).__name__}: {e}")
                continue
            paths.append((name, "float32", f"onnxruntime {ort.__version__}",
                          lambda i, s=session: head_at_masks("float32", s.run(None, feeds[i])[0], i)))
    elif onnx_path is not None and installed("onnxruntime"):
        skipped.append("ONNX Runtime: measured in float32 only (its CPU provider has no bfloat16 kernels)")
    elif onnx_path is not None:
        skipped.append("ONNX Runtime: onnxruntime not installed (pip install onnxruntime)")

    if onnx_path is not None and installed("openvino"):
        import openvino as ov

        core = ov.Core()
        ov_model = core.read_model(str(onnx_path))
        for dtype in args.dtypes:
            hint = {"float32": "f32", "bfloat16": "bf16"}[dtype]
            compiled = core.compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                            "INFERENCE_NUM_THREADS": threads,
                                                            "PERFORMANCE_HINT": "LATENCY"})

            request = compiled.create_infer_request()

            def run_ov(i, request=request, dtype=dtype):
                request.infer(feeds[i])
                return head_at_masks(dtype, request.get_output_tensor(0).data.copy(), i)

            paths.append((f"OpenVINO ({hint})", dtype, f"openvino {ov.__version__}", run_ov))
    elif onnx_path is not None:
        skipped.append("OpenVINO: openvino not installed (pip install openvino)")

    # Pass 1 (untimed): every path's answers, for the error column, and warm-up of every shape.
    # Pass 2 (timed): batch by batch, every path in turn, so load from other processes slows all alike.
    outputs = {p[0] + p[1]: [] for p in paths}
    seconds = {p[0] + p[1]: 0.0 for p in paths}
    with torch.inference_mode():
        for i in range(len(data)):
            for name, dtype, _, fn in paths:
                outputs[name + dtype].append(fn(i))
        for i in range(len(data)):
            for name, dtype, _, fn in paths:
                t0 = time.perf_counter()
                fn(i)
                seconds[name + dtype] += time.perf_counter() - t0
    for ours in engines:
        ours.close()

    rows = []
    for name, dtype, note, _ in paths:
        t = seconds[name + dtype]
        err = max((o.float() - r).abs().max().item() for o, r in zip(outputs[name + dtype], reference))
        rows.append({"path": name, "dtype": dtype, "seconds": t, "sequences_per_s": len(texts) / t,
                     "real_tokens_per_s": sum(lengths) / t, "gflop_per_s": flops / t / 1e9,
                     "max_err_vs_hf_fp32": err, "max_err": f"{err:.1e}", "note": note})
        print(f"{name} [{dtype}]: {t:.2f} s, {flops / t / 1e9:.1f} GFLOP/s, max err {err:.1e}", flush=True)
    gc.collect()
    for name in peaks:  # measured again at the end: the best of both (the machine may have been busy once)
        peaks[name] = max(peaks[name], gemm_peak(getattr(torch, name)))
    for r in rows:
        r["fraction_of_gemm_peak"] = r["gflop_per_s"] * 1e9 / peaks[r["dtype"]]
    for line in skipped:
        print(f"SKIPPED: {line}")
    base = {r["dtype"]: r["seconds"] for r in rows if r["path"].startswith("transformers")}
    for r in rows:
        r["vs_transformers_same_dtype"] = base.get(r["dtype"], float("nan")) / r["seconds"]
        r["vs_transformers_fp32"] = base.get("float32", float("nan")) / r["seconds"]
    report(
        f"bench_runtimes: {len(texts)} SST-2 prompts, roberta-base shape, length-sorted batches of {args.batch_size}, "
        f"{threads} threads, {100 * (1 - sum(lengths) / padded):.0f}% padding in the padded paths; GEMM peak "
        + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()),
        rows,
        ["path", "dtype", "seconds", "sequences_per_s", "real_tokens_per_s", "gflop_per_s", "fraction_of_gemm_peak",
         "vs_transformers_same_dtype", "vs_transformers_fp32", "max_err"],
        args.out,
        extra={"gemm_peak_flop_per_s": peaks, "useful_flops": flops, "masks": n_masks, "real_tokens": sum(lengths),
               "padded_tokens": padded, "skipped": skipped},
    )


if __name__ == "__main__":
    main()
