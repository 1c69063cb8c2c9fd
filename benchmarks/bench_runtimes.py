"""The runtimes users would pick instead: ONNX Runtime and OpenVINO against transformers and this project.

Every path computes the same answers on the same random roberta-base-shaped checkpoint, in one run,
at batch sizes 1, 8, 32 and 64, for two tasks: "mask" -- the full-vocabulary logits at each "<mask>"
of the SST-2 prompts -- and "forward" -- ``model(**batch).logits``, the logits at every position of the
padded batch (compared at the real tokens):

  transformers defaults       RobertaForMaskedLM.from_pretrained(ckpt) as a script gets it, batches in
                              data order, full logits then the rows picked (float32)
  transformers sdpa           RobertaForMaskedLM's encoder (sdpa) on length-sorted batches, LM head only
                              on the answer rows: its strongest setting
  ONNX Runtime                that encoder exported once with torch.onnx.export (hidden states out,
                              dynamic batch and length), CPUExecutionProvider, all graph optimisations
  ONNX Runtime, fused         the same file through onnxruntime.transformers.optimizer (fused attention,
                              LayerNorm, GELU; model_type "bert") when it applies
  OpenVINO f32 / bf16         the same ONNX file read by OpenVINO (INFERENCE_PRECISION_HINT f32 / bf16;
                              OpenVINO picks bf16 by itself on CPUs with AVX512-BF16 or AMX)
  this project                compute_mlm_logits ("mask") / forward ("forward"), enable_lora=False

The ONNX Runtime and OpenVINO paths apply the LM head in torch at the mask rows (in the path's
precision), so the encoder is what is compared. All batches but the "defaults" row's are length-sorted
(least padding: the strongest setting for the padded runtimes; the engine does not pad anyway). Each
path's answers are checked against transformers float32 (max abs error over the answer logits). A first pass over all
batches warms every path up (every shape) and collects the answers; the timed pass then runs batch
by batch with every path in turn, so load from other processes slows all paths alike.

Fraction of peak: the script measures this machine's honest GEMM peak per dtype itself (the best of
every matrix-product path here -- torch's F.linear, oneDNN's linear, ONNX Runtime's and OpenVINO's
MatMul -- on 2048x768 @ 768x3072, at the start and again at the end; benchmarks/gemm_peak.py) and each path's
achieved FLOP/s from the useful work: 2 x (encoder matmul parameters) per real token + attention
(4 x hidden x length per token and layer: QK^T and PV over the real tokens) + the LM head at the
masks (2 x (H*H + H*V) each). Padding is not counted: a padded path that computes more than that is
charged for it.

    pip install -e ".[runtimes]"                      # onnxruntime, openvino, onnx
    python benchmarks/bench_runtimes.py --limit 128    # float32 + bfloat16, both tasks, batches 1/8/32/64
    python benchmarks/bench_runtimes.py --batch-sizes 32 --tasks mask    # quick look

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
from gemm_peak import honest_peak  # noqa: E402


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _peak_text(peaks) -> str:
    return ", ".join(f"{k} {v['flop_per_s'] / 1e9:.0f} GFLOP/s ({v['path']})" for k, v in peaks.items())


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
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--tasks", nargs="+", default=["mask", "forward"], choices=["mask", "forward"],
                    help="mask: logits at the masks (compute_mlm_logits); forward: logits at every token")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--gemm", default=None, help="the engine's GEMM path (default: auto, chosen on this host)")
    ap.add_argument("--threads", type=int, default=0, help="torch/ORT/OpenVINO threads (0 = torch's default)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "runtimes.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer, RobertaForMaskedLM

    from sglang_hf_bridge import SGLangRobertaForMaskedLM

    threads = torch.get_num_threads()
    peaks = {name: honest_peak(getattr(torch, name)) for name in args.dtypes}
    print("GEMM peak (best path, 2048x768 @ 768x3072): " + _peak_text(peaks), flush=True)

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    texts = prompts(args.limit)
    lengths = [len(ids) for ids in tok(texts)["input_ids"]]
    mask_id = tok.mask_token_id
    ckpt = roberta_base_checkpoint()
    hf = {dtype: RobertaForMaskedLM.from_pretrained(ckpt, attn_implementation="sdpa",
                                                    dtype=getattr(torch, dtype)).eval()
          for dtype in sorted(set(args.dtypes) | {"float32"})}
    hf_eager = RobertaForMaskedLM.from_pretrained(ckpt).eval()  # transformers' defaults, as a script loads it
    config = hf["float32"].config
    engines, engine_gemm = {}, {}
    for dtype in args.dtypes:
        engines[dtype] = SGLangRobertaForMaskedLM.from_pretrained(ckpt, dtype=dtype, enable_lora=False, gemm=args.gemm)
        engine_gemm[dtype] = engines[dtype].runtime.config.gemm

    skipped, runtimes = [], []  # runtimes: (name, dtype, note, fn(feed) -> hidden states [B, T, H])
    if not installed("onnx") or not (installed("onnxruntime") or installed("openvino")):
        skipped.append("ONNX Runtime / OpenVINO: packages not installed (pip install -e \".[runtimes]\" "
                       "installs onnxruntime, openvino, onnx)")
        onnx_path = None
    else:
        t0 = time.perf_counter()
        onnx_path = export_onnx(ckpt, tok)
        print(f"ONNX encoder: {onnx_path} ({time.perf_counter() - t0:.0f} s)", flush=True)
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
            runtimes.append((name, "float32", f"onnxruntime {ort.__version__}",
                             lambda feed, s=session: s.run(None, feed)[0]))
    elif onnx_path is not None and installed("onnxruntime"):
        skipped.append("ONNX Runtime: measured in float32 only (its CPU provider has no bfloat16 kernels)")
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

            def run_ov(feed, request=request):
                request.infer(feed)
                return request.get_output_tensor(0).data.copy()

            runtimes.append((f"OpenVINO ({hint})", dtype, f"openvino {ov.__version__}", run_ov))

    rows = []
    for batch_size in args.batch_sizes:
        order = sorted(range(len(texts)), key=lambda i: lengths[i])
        data = [tok([texts[i] for i in order[s : s + batch_size]], return_tensors="pt", padding=True)
                for s in range(0, len(texts), batch_size)]
        unsorted = [tok(texts[s : s + batch_size], return_tensors="pt", padding=True)
                    for s in range(0, len(texts), batch_size)]
        feeds = [{"input_ids": b["input_ids"].numpy(), "attention_mask": b["attention_mask"].numpy()} for b in data]
        at_mask = [b["input_ids"] == mask_id for b in data]
        real = [b["attention_mask"].bool() for b in data]
        for task in args.tasks:
            rows += _run_task(task, batch_size, data, unsorted, feeds, at_mask, real, hf, hf_eager, engines,
                              runtimes, mask_id, lengths, config)
    for ours in engines.values():
        ours.close()
    gc.collect()
    for name in peaks:  # measured again at the end: the best of both (the machine may have been busy once)
        again = honest_peak(getattr(torch, name))
        if again["flop_per_s"] > peaks[name]["flop_per_s"]:
            peaks[name] = again
    for r in rows:
        r["fraction_of_gemm_peak"] = r["gflop_per_s"] * 1e9 / peaks[r["dtype"]]["flop_per_s"]
        key = (r["task"], r["batch"], r["dtype"])
        peers = [o["seconds"] for o in rows
                 if (o["task"], o["batch"], o["dtype"]) == key and not o["path"].startswith("sglang_hf_bridge")]
        r["vs_fastest_peer_same_dtype"] = min(peers) / r["seconds"] if peers else float("nan")
    for line in skipped:
        print(f"SKIPPED: {line}")
    report(
        f"bench_runtimes: {len(texts)} SST-2 prompts, roberta-base shape, length-sorted batches, {threads} threads; "
        "GEMM peak " + _peak_text(peaks),
        rows,
        ["task", "batch", "dtype", "path", "seconds", "sequences_per_s", "gflop_per_s", "fraction_of_gemm_peak",
         "vs_fastest_peer_same_dtype", "max_err"],
        args.out,
        extra={"gemm_peak": peaks, "engine_gemm": engine_gemm, "real_tokens": sum(lengths), "skipped": skipped},
    )


def _run_task(task, batch_size, data, unsorted, feeds, at_mask, real, hf, hf_eager, engines, runtimes, mask_id,
              lengths, config):
    """Every path on one task at one batch size: answers checked against transformers float32, then
    timed batch by batch with every path in turn (load from other processes slows all alike)."""
    n_masks = sum(int(m.sum()) for m in at_mask)
    select = at_mask if task == "mask" else real  # the rows whose logits are the answer

    def head(dtype, hidden, i):
        model = hf[dtype]
        hidden = torch.as_tensor(hidden).to(model.dtype)
        if task == "mask":
            return model.lm_head(hidden[select[i]])
        return model.lm_head(hidden)[select[i]]  # logits at every position, as model(**batch).logits

    paths = []  # (name, dtype, note, fn(i) -> answer rows, data it runs on)
    for dtype, ours in engines.items():
        model = hf[dtype]
        if task == "mask":
            paths.append(("transformers sdpa, length-sorted, LM head at the mask", dtype, "its strongest setting",
                          lambda i, m=model: m.lm_head(Encoder(m)(**data[i])[select[i]])))
        else:
            paths.append(("transformers sdpa, length-sorted", dtype, "its strongest setting",
                          lambda i, m=model: m(**data[i]).logits[select[i]]))
        if task == "mask":
            paths.append(("sglang_hf_bridge compute_mlm_logits", dtype, f"gemm={ours.runtime.config.gemm}",
                          lambda i, m=ours: m.compute_mlm_logits(data[i]["input_ids"], data[i]["attention_mask"],
                                                                 mask_token_id=mask_id)))
        else:
            paths.append(("sglang_hf_bridge forward", dtype, f"gemm={ours.runtime.config.gemm}",
                          lambda i, m=ours: m(**data[i]).logits[real[i]]))
    # transformers as a script gets it: default attention, batches in data order, full logits then picked
    defaults = [(b, b["input_ids"] == mask_id if task == "mask" else b["attention_mask"].bool()) for b in unsorted]
    paths.append(("transformers defaults, unsorted batches", "float32", "from_pretrained(ckpt)", None))
    for name, dtype, note, run in runtimes:
        paths.append((name, dtype, note, lambda i, run=run, dtype=dtype: head(dtype, run(feeds[i]), i)))

    with torch.inference_mode():
        reference = [hf["float32"].lm_head(Encoder(hf["float32"])(**b)[sel]) for b, sel in zip(data, select)]
        errors = {}
        for name, dtype, _, fn in paths:
            if fn is not None:
                errors[name + dtype] = max((fn(i).float() - reference[i]).abs().max().item() for i in range(len(data)))
        seconds = {p[0] + p[1]: 0.0 for p in paths}
        for i in range(len(data)):
            for name, dtype, _, fn in paths:
                t0 = time.perf_counter()
                if fn is None:
                    b, sel = defaults[i]
                    hf_eager(**b).logits[sel]
                else:
                    fn(i)
                seconds[name + dtype] += time.perf_counter() - t0
    flops = useful_flops(config, lengths, n_masks if task == "mask" else sum(lengths))
    rows = []
    for name, dtype, note, _ in paths:
        t = seconds[name + dtype]
        err = errors.get(name + dtype)
        rows.append({"task": task, "batch": batch_size, "path": name, "dtype": dtype, "seconds": t,
                     "sequences_per_s": sum(len(b["input_ids"]) for b in data) / t, "gflop_per_s": flops / t / 1e9,
                     "max_err_vs_hf_fp32": err, "max_err": "" if err is None else f"{err:.1e}", "note": note})
        print(f"{task} b={rows[-1]['batch']} {name} [{dtype}]: {t:.2f} s, {flops / t / 1e9:.1f} GFLOP/s, "
              f"max err {rows[-1]['max_err']}", flush=True)
    return rows


if __name__ == "__main__":
    main()
