"""ModernBERT on the engine against what users would pick instead, in one run, as ratios to the fastest peer.

Why: ModernBERT is the encoder people use for long inputs (8,192 positions, 128-token local
attention on two layers in three). Its support is only worth having if the engine beats
transformers' strongest CPU setting and the exported runtimes on those inputs. What, every path on
the same random-weight ModernBERT-base-shaped model (hidden 768, intermediate 1152, 12 heads,
``--layers`` layers (22 in the published model), local_attention 128, a global layer every 3rd,
vocabulary 50368, float32) and the same random token ids:

  mlm-docs   masked-LM logits at the masks (15 % of each document's positions replaced by the mask
             id) on documents of ``--doc-lengths`` tokens: transformers ModernBertForMaskedLM with
             attn_implementation="sdpa", one document per call (no padding), encoder then head at the
             masks only (its strongest CPU setting); transformers as a script gets it
             (from_pretrained(ckpt): its default attention, named in the row; full logits, then the
             mask rows); that encoder exported to ONNX (ONNX Runtime, ONNX Runtime fused by
             onnxruntime.transformers' optimizer, OpenVINO f32; the head applied in torch at the
             masks); this project's compute_mlm_logits one document per call and all documents in
             one call.
  mixed      sequence classification (ModernBertForSequenceClassification, num_labels=2,
             classifier_pooling="mean") on ``--queries`` short queries (5-32 tokens) mixed in data
             order with ``--docs`` documents (512-2048 tokens), at ``--batch-sizes``: transformers
             sdpa on length-sorted batches (its strongest setting) and in data order, the exported
             classifier (ONNX Runtime / OpenVINO) on length-sorted batches, and
             SGLangAutoModelForSequenceClassification in data order (the engine does not pad).

Export: torch.onnx.export of the eager-attention model with dynamic batch and length axes,
dynamo=False first, then dynamo=True; a model that exports neither way gets rows saying
"did not export: <the exception's first line>" instead of timings.

A first pass (the answers' check) warms every path and shape; timed passes then run path by path,
each path's units (documents or batches) in one block, the blocks' order rotated per repeat,
``--repeats`` times, median (bench_heads.timed). Errors: max abs difference from transformers
float32 (sdpa) over the answer logits. Fraction of peak: useful FLOPs (modernbert_flops: real
tokens only, the local window's keys on sliding layers, the head on the rows it reads) over this
host's honest GEMM peak (gemm_peak.honest_peak, best of start and end). vs_fastest_peer: the
fastest non-project path's seconds over the row's (> 1 = faster than every peer).

    python benchmarks/bench_modernbert.py     # the full run: 22 layers, docs 512..8192, 56 queries + 8 docs
                                              # at batch 8/32; ~1.5 h on 2 cores (estimated from 2-layer runs)
    python benchmarks/bench_modernbert.py --layers 2 --doc-lengths 512,1024 --queries 6 --docs 2 \\
        --batch-sizes 4 --repeats 1            # smoke run (~1.5 min on 2 cores), written to the temp dir

A run with other settings than the defaults (``--threads``, ``--max-score-gb`` and ``--out`` aside)
writes its JSON to the temp dir unless ``--out`` is given, so smoke runs do not replace
benchmarks/results/modernbert.json.

Memory: the eager export materialises every layer's [batch, 12, T, T] attention scores; ONNX Runtime
peaked at ~8.6 GB for one 8192-token document and ~15 GB for a [32, 2048] batch. The exported
paths are not run (a row says so) where one such tensor would exceed ``--max-score-gb`` (4 GB:
the 8192-token document runs, batch 32 of the mixed set does not). With 2 layers the whole run
peaked at 18 GB resident (the 8192-token document); expect ~21 GB with 22 layers.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, report  # noqa: E402
from bench_heads import onnx_runtimes, timed  # noqa: E402
from bench_runtimes import _peak_text, installed  # noqa: E402
from gemm_peak import honest_peak  # noqa: E402

OURS = "sglang_hf_bridge"
RESULTS = REPO / "benchmarks" / "results" / "modernbert.json"
# ModernBERT-base's special ids (its tokenizer's): random document ids are drawn below them.
UNK, CLS, SEP, PAD, MASK = 50280, 50281, 50282, 50283, 50284
MASK_FRACTION = 0.15
QUERY_RANGE, DOC_RANGE = (5, 32), (512, 2048)


def base_config(layers: int, **overrides):
    """ModernBERT-base's published config (hidden 768, intermediate 1152, 12 heads, 128-token local
    attention, a global layer every 3rd, 8192 positions, vocabulary 50368) with ``layers`` layers."""
    from transformers import ModernBertConfig

    return ModernBertConfig(
        vocab_size=50368, hidden_size=768, intermediate_size=1152, num_hidden_layers=layers, num_attention_heads=12,
        hidden_activation="gelu", max_position_embeddings=8192, initializer_range=0.02, initializer_cutoff_factor=2.0,
        norm_eps=1e-5, norm_bias=False, pad_token_id=PAD, eos_token_id=SEP, bos_token_id=CLS, cls_token_id=CLS,
        sep_token_id=SEP, mask_token_id=MASK, global_rope_theta=160000.0, local_rope_theta=10000.0,
        attention_bias=False, attention_dropout=0.0, global_attn_every_n_layers=3, local_attention=128,
        embedding_dropout=0.0, mlp_bias=False, mlp_dropout=0.0, decoder_bias=True, classifier_pooling="mean",
        classifier_dropout=0.0, classifier_bias=False, classifier_activation="gelu", sparse_prediction=False,
        **overrides)


def modernbert_checkpoint(kind: str, layers: int, seed: int = 0) -> Path:
    """A random-weight ModernBERT-base-shaped ``ModernBertForMaskedLM`` (kind "mlm") or
    ``ModernBertForSequenceClassification`` (kind "seqcls", 2 labels, mean pooling), cached in the temp dir."""
    from transformers import ModernBertForMaskedLM, ModernBertForSequenceClassification

    path = Path(tempfile.gettempdir()) / f"sglang-hf-bridge-bench-modernbert-base-{layers}l-{kind}-{seed}"
    if not (path / "model.safetensors").exists():
        torch.manual_seed(seed)
        if kind == "mlm":
            model = ModernBertForMaskedLM(base_config(layers))
        else:
            model = ModernBertForSequenceClassification(base_config(layers, num_labels=2))
        model.save_pretrained(path)
    return path


def layer_kinds(config):
    """Per layer: True where the layer attends only to its local window."""
    types = getattr(config, "layer_types", None)
    if types:
        return [t == "sliding_attention" for t in types]
    every = config.global_attn_every_n_layers
    return [i % every != 0 for i in range(config.num_hidden_layers)]


def half_window(config) -> int:
    """Keys each side a token sees on a sliding layer: local_attention // 2 (transformers' sliding_window)."""
    return getattr(config, "sliding_window", None) or config.local_attention // 2


def modernbert_flops(config, lengths, head_rows: int, head_cols: int) -> float:
    """Useful FLOPs: per real token and layer Wqkv 2*H*3H, Wo 2*H*H, Wi 2*H*2I, mlp Wo 2*I*H, plus
    attention 4*H*keys_seen (keys_seen = min(n, 2*window+1) on sliding layers, n on global ones);
    plus the head on the ``head_rows`` rows it reads (dense H*H, then H*``head_cols``)."""
    h, i = config.hidden_size, config.intermediate_size
    per_token = 2 * h * 3 * h + 2 * h * h + 2 * h * 2 * i + 2 * i * h
    window = 2 * half_window(config) + 1
    total = 0
    for n in lengths:
        for sliding in layer_kinds(config):
            total += n * (per_token + 4 * h * (min(n, window) if sliding else n))
    return float(total + head_rows * 2 * (h * h + h * head_cols))


def random_sequence(n: int, rng: random.Random):
    """CLS, n - 2 random ordinary ids, SEP."""
    return torch.tensor([CLS] + [rng.randrange(5, UNK) for _ in range(n - 2)] + [SEP])


def masked_documents(lengths, seed: int = 0):
    """Random documents with 15 % of the inner positions set to the mask id: (ids [n], bool mask [n]) each."""
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = random_sequence(n, rng)
        at = torch.zeros(n, dtype=torch.bool)
        at[rng.sample(range(1, n - 1), max(1, round(MASK_FRACTION * n)))] = True
        ids[at] = MASK
        out.append((ids, at))
    return out


def padded(seqs):
    """Right-padded ``{"input_ids", "attention_mask"}`` for 1-D id tensors."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), PAD, dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)], mask[r, : len(s)] = s, 1
    return {"input_ids": ids, "attention_mask": mask}


class Hidden(torch.nn.Module):
    """ModernBertModel's last hidden state for (input_ids, attention_mask): what gets exported for mlm-docs."""

    def __init__(self, mlm):
        super().__init__()
        self.model = mlm.model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class Logits(torch.nn.Module):
    """The classifier's logits for (input_ids, attention_mask): what gets exported for mixed."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def export_onnx(module, name: str, out_axes: dict, log: list):
    """``module`` as ONNX (dynamic batch and length; cached in the temp dir): torch.onnx.export with
    dynamo=False, then dynamo=True. Returns (path or None, why not)."""
    path = Path(tempfile.gettempdir()) / f"{name}.onnx"
    if path.exists():
        return path, None
    rng = random.Random(1)
    example = padded([random_sequence(300, rng), random_sequence(200, rng)])  # longer than the window, padded
    axes = {k: {0: "batch", 1: "tokens"} for k in ("input_ids", "attention_mask")}
    tmp = path.with_suffix(".partial.onnx")
    errors = []
    for dynamo in (False, True):
        t0 = time.perf_counter()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracer's and the legacy exporter's warnings: answers are checked
                torch.onnx.export(module.eval(), (example["input_ids"], example["attention_mask"]), str(tmp),
                                  dynamo=dynamo, input_names=["input_ids", "attention_mask"], output_names=["out"],
                                  dynamic_axes={**axes, "out": out_axes}, opset_version=17 if not dynamo else 18)
            tmp.rename(path)
            log.append(f"{name}: exported with dynamo={dynamo} ({time.perf_counter() - t0:.0f} s)")
            return path, None
        except Exception as e:  # noqa: BLE001 - a model that does not export is a result, not a crash
            errors.append(f"dynamo={dynamo}: {first_line(e)}")
            print(f"ONNX export of {name} with dynamo={dynamo} failed: {first_line(e)}", flush=True)
            for leftover in path.parent.glob(tmp.name + "*"):
                leftover.unlink()
    return None, "did not export: " + "; ".join(errors)


def exported_paths(model, wrapper, name, config, threads, skipped, section):
    """[(name, note, fn(feed) -> numpy output)] of the exported model, or rows-to-be saying why none."""
    if not installed("onnx"):
        skipped.append(f"{section} ONNX Runtime / OpenVINO: onnx not installed")
        return [], []
    log = []
    out_axes = {0: "batch", 1: "tokens"} if wrapper is Hidden else {0: "batch"}
    path, why = export_onnx(wrapper(model), name, out_axes, log)
    for line in log:
        print(line, flush=True)
    if path is None:
        skipped.append(f"{section} ONNX Runtime / OpenVINO: {why}")
        return [], [(n, why) for n in ("ONNX Runtime", "OpenVINO (f32)")]
    return [(n, note.split("-")[0], fn) for n, note, fn in onnx_runtimes(path, config, threads, skipped, section)], []


def score_gb(config, batch: int, tokens: int) -> float:
    """GB of one attention-score tensor [batch, heads, tokens, tokens] in float32: what the eager
    export materialises per layer (ONNX Runtime held about 2.5 such tensors at its peak here)."""
    return batch * config.num_attention_heads * tokens * tokens * 4 / 1e9


def too_big(config, shapes, limit_gb: float):
    """None, or the reason the exported paths are not run on batches of these [batch, tokens] shapes."""
    b, t = max(shapes, key=lambda bt: score_gb(config, *bt))
    gb = score_gb(config, b, t)
    if gb <= limit_gb:
        return None
    return (f"not run: batch [{b}, {t}] needs {gb:.1f} GB per attention-score tensor in the eager export "
            f"(> --max-score-gb {limit_gb:g})")


def _row(section, batch, group, path, seconds, tokens, flops, err, note):
    return {"section": section, "batch": batch, "group": group, "path": path, "seconds": seconds,
            "tokens_per_s": None if seconds is None else tokens / seconds,
            "gflop_per_s": None if seconds is None else flops / seconds / 1e9,
            "max_err": "" if err is None else f"{err:.1e}", "max_abs_err": err, "note": note}


def bench_mlm_docs(doc_lengths, layers, repeats, threads, skipped, runtimes_on, max_score_gb):
    from transformers import ModernBertForMaskedLM

    from sglang_hf_bridge import SGLangAutoModelForMaskedLM

    ckpt = modernbert_checkpoint("mlm", layers)
    sdpa = ModernBertForMaskedLM.from_pretrained(ckpt, attn_implementation="sdpa").eval()
    defaults = ModernBertForMaskedLM.from_pretrained(ckpt).eval()  # as a script loads it
    default_attn = defaults.config._attn_implementation
    config = sdpa.config
    docs = masked_documents(doc_lengths)
    n_masks = sum(int(at.sum()) for _, at in docs)
    flops = modernbert_flops(config, doc_lengths, n_masks, config.vocab_size)
    tokens = sum(doc_lengths)
    single = [{"input_ids": ids[None], "attention_mask": torch.ones(1, len(ids), dtype=torch.long)} for ids, _ in docs]
    feeds = [{k: v.numpy() for k, v in b.items()} for b in single]
    everything = padded([ids for ids, _ in docs])
    runtimes, failed = [], []
    if runtimes_on:
        eager = ModernBertForMaskedLM.from_pretrained(ckpt, attn_implementation="eager").eval()
        runtimes, failed = exported_paths(eager, Hidden, ckpt.name + "-encoder", config, threads, skipped, "mlm-docs")
        del eager
        why = too_big(config, [(1, n) for n in doc_lengths], max_score_gb)
        if why and runtimes:
            skipped.append(f"mlm-docs ONNX Runtime / OpenVINO: {why}")
            failed, runtimes = [(name, why) for name, _, _ in runtimes], []
    ours = SGLangAutoModelForMaskedLM.from_pretrained(ckpt, device="cpu", enable_lora=False)
    note = f"gemm={ours.runtime.config.gemm}"

    def head(hidden, i):
        return sdpa.decoder(sdpa.head(torch.as_tensor(hidden)[0][docs[i][1]]))

    one_doc, all_docs = "1 doc/call", "all docs/call"
    paths = [(one_doc, "transformers sdpa, head at the masks", "its strongest setting (no padding)",
              lambda i: head(sdpa.model(**single[i]).last_hidden_state, i)),
             (one_doc, f"transformers defaults (attn={default_attn}), full logits",
              "from_pretrained(ckpt)" + (", = sdpa" if default_attn == "sdpa" else ""),
              lambda i: defaults(**single[i]).logits[0][docs[i][1]]),
             *[(one_doc, name, n, lambda i, fn=fn: head(fn(feeds[i]), i)) for name, n, fn in runtimes],
             (one_doc, f"{OURS} compute_mlm_logits", note,
              lambda i: ours.compute_mlm_logits(single[i]["input_ids"], single[i]["attention_mask"],
                                                mask_token_id=MASK)),
             # one call over every document, made in the first unit (timed() gives each path the same units)
             (all_docs, f"{OURS} compute_mlm_logits, all docs in one call", note,
              lambda i: ours.compute_mlm_logits(everything["input_ids"], everything["attention_mask"],
                                                mask_token_id=MASK) if i == 0 else None)]
    with torch.inference_mode():
        reference = [head(sdpa.model(**b).last_hidden_state, i) for i, b in enumerate(single)]
        errors = {}
        for batch, name, _, fn in paths:  # also the warm pass
            if batch == all_docs:
                errors[name] = (fn(0) - torch.cat(reference)).abs().max().item()
            else:
                errors[name] = max((fn(i).float() - reference[i]).abs().max().item() for i in range(len(docs)))
            print(f"mlm-docs {name}: max err {errors[name]:.1e}", flush=True)
        timing = timed([(name, note, fn) for _, name, note, fn in paths], len(docs), repeats)
    rows = []
    for batch, name, note, _ in paths:
        rows.append(_row("mlm-docs", batch, "docs", name, timing[name][0], tokens, flops, errors[name], note))
        print(f"mlm-docs {name}: {timing[name][0]:.2f} s", flush=True)
    rows += [_row("mlm-docs", one_doc, "docs", name, None, tokens, flops, None, why) for name, why in failed]
    extra = {"mlm_docs": {"doc_lengths": list(doc_lengths), "masks": n_masks, "tokens": tokens, "flops": flops,
                          "transformers_default_attention": default_attn, "engine_gemm": ours.runtime.config.gemm}}
    ours.close()
    return rows, extra


def mixed_items(n_queries: int, n_docs: int, seed: int = 0):
    """Queries (5-32 tokens) and documents (512-2048 tokens) shuffled together: 1-D id tensors, data order."""
    rng = random.Random(seed)
    lengths = [rng.randint(*QUERY_RANGE) for _ in range(n_queries)] + [rng.randint(*DOC_RANGE) for _ in range(n_docs)]
    rng.shuffle(lengths)
    return [random_sequence(n, rng) for n in lengths]


def bench_mixed(n_queries, n_docs, batch_sizes, layers, repeats, threads, skipped, runtimes_on, max_score_gb):
    from transformers import ModernBertForSequenceClassification

    from sglang_hf_bridge import SGLangAutoModelForSequenceClassification

    ckpt = modernbert_checkpoint("seqcls", layers)
    sdpa = ModernBertForSequenceClassification.from_pretrained(ckpt, attn_implementation="sdpa").eval()
    config = sdpa.config
    items = mixed_items(n_queries, n_docs)
    lengths = [len(s) for s in items]
    flops = modernbert_flops(config, lengths, len(items), config.num_labels)
    runtimes, failed = [], []
    if runtimes_on:
        eager = ModernBertForSequenceClassification.from_pretrained(ckpt, attn_implementation="eager").eval()
        runtimes, failed = exported_paths(eager, Logits, ckpt.name, config, threads, skipped, "mixed")
        del eager
    ours = SGLangAutoModelForSequenceClassification.from_pretrained(ckpt, device="cpu", enable_lora=False)
    note = f"gemm={ours.runtime.config.gemm}"
    rows = []
    for bs in batch_sizes:
        order = sorted(range(len(items)), key=lambda i: lengths[i])
        data = [padded([items[i] for i in order[s : s + bs]]) for s in range(0, len(items), bs)]
        unsorted = [padded(items[s : s + bs]) for s in range(0, len(items), bs)]
        feeds = [{k: v.numpy() for k, v in b.items()} for b in data]
        why = too_big(config, [tuple(b["input_ids"].shape) for b in data], max_score_gb) if runtimes else None
        if why:
            skipped.append(f"mixed b={bs} ONNX Runtime / OpenVINO: {why}")
        not_run = failed + ([(name, why) for name, _, _ in runtimes] if why else [])
        paths = [("transformers sdpa, length-sorted", "its strongest setting", lambda i: sdpa(**data[i]).logits),
                 ("transformers sdpa, data order", "default attention = sdpa"
                  if sdpa.config._attn_implementation == "sdpa" else "", lambda i: sdpa(**unsorted[i]).logits),
                 *[(f"{name}, length-sorted", n, lambda i, fn=fn: torch.as_tensor(fn(feeds[i])))
                   for name, n, fn in (runtimes if not why else [])],
                 (f"{OURS} SGLangAutoModelForSequenceClassification, data order", note,
                  lambda i: ours(**unsorted[i]).logits)]
        with torch.inference_mode():
            reference = [sdpa(**b).logits for b in data]
            by_item = torch.empty(len(items), config.num_labels)
            by_item[order] = torch.cat(reference)
            data_order = list(by_item.split(bs))
            errors = {}
            for name, _, fn in paths:  # also the warm pass
                ref = reference if "length-sorted" in name else data_order
                errors[name] = max((fn(i).float() - ref[i]).abs().max().item() for i in range(len(data)))
            timing = timed(paths, len(data), repeats)
        for name, n, _ in paths:
            rows.append(_row("mixed", bs, f"b{bs}", name, timing[name][0], sum(lengths), flops, errors[name], n))
            print(f"mixed b={bs} {name}: {timing[name][0]:.2f} s, max err {rows[-1]['max_err']}", flush=True)
        rows += [_row("mixed", bs, f"b{bs}", f"{name}, length-sorted", None, sum(lengths), flops, None, reason)
                 for name, reason in not_run]
    extra = {"mixed": {"queries": n_queries, "docs": n_docs, "lengths": lengths, "tokens": sum(lengths),
                       "flops": flops, "engine_gemm": ours.runtime.config.gemm}}
    ours.close()
    return rows, extra


def _ints(text: str):
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=22, help="encoder layers (ModernBERT-base: 22; fewer for smoke runs)")
    ap.add_argument("--doc-lengths", type=_ints, default=[512, 1024, 2048, 4096, 8192],
                    help="mlm-docs: comma-separated document lengths in tokens")
    ap.add_argument("--queries", type=int, default=56, help="mixed: short queries (5-32 tokens)")
    ap.add_argument("--docs", type=int, default=8, help="mixed: documents (512-2048 tokens)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32], help="mixed: batch sizes")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per setting (median); one warm pass before")
    ap.add_argument("--sections", nargs="+", default=["mlm-docs", "mixed"], choices=["mlm-docs", "mixed"])
    ap.add_argument("--no-runtimes", action="store_true", help="skip the ONNX export and ONNX Runtime / OpenVINO")
    ap.add_argument("--max-score-gb", type=float, default=4.0,
                    help="skip the exported paths where one attention-score tensor [batch, heads, T, T] of the eager "
                         "export would exceed this many GB (ONNX Runtime peaked at ~2.5x that on top of the model)")
    ap.add_argument("--threads", type=int, default=0, help="torch/ORT/OpenVINO threads (0 = torch's default)")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"JSON path (default: {RESULTS.relative_to(REPO)} for the default settings, "
                         "else the temp dir)")
    args = ap.parse_args()
    full_run = all(getattr(args, k) == ap.get_default(k) for k in vars(args)
                   if k not in ("out", "threads", "max_score_gb"))
    out = args.out or (RESULTS if full_run else Path(tempfile.gettempdir()) / "sglang-hf-bridge-modernbert-smoke.json")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    t_start = time.perf_counter()
    peak = honest_peak(torch.float32)
    print("GEMM peak (best path, 2048x768 @ 768x3072): " + _peak_text({"float32": peak}), flush=True)
    skipped, rows, extra = [], [], {}
    if "mlm-docs" in args.sections:
        r, e = bench_mlm_docs(args.doc_lengths, args.layers, args.repeats, threads, skipped, not args.no_runtimes,
                           args.max_score_gb)
        rows, extra = rows + r, {**extra, **e}
        gc.collect()
    if "mixed" in args.sections:
        r, e = bench_mixed(args.queries, args.docs, args.batch_sizes, args.layers, args.repeats, threads, skipped,
                           not args.no_runtimes, args.max_score_gb)
        rows, extra = rows + r, {**extra, **e}
        gc.collect()
    again = honest_peak(torch.float32)  # the best of start and end: the machine may have been busy once
    peak = again if again["flop_per_s"] > peak["flop_per_s"] else peak
    for r in rows:
        timed_row = r["seconds"] is not None
        r["fraction_of_gemm_peak"] = r["gflop_per_s"] * 1e9 / peak["flop_per_s"] if timed_row else None
        peers = [o["seconds"] for o in rows if (o["section"], o["group"]) == (r["section"], r["group"])
                 and o["seconds"] is not None and not o["path"].startswith(OURS)]
        r["vs_fastest_peer"] = min(peers) / r["seconds"] if peers and timed_row else None
    for line in skipped:
        print(f"SKIPPED: {line}")
    report(f"bench_modernbert: ModernBERT-base shape ({args.layers} layers, random weights), float32, {threads} "
           f"threads; " + "; ".join(({"mlm-docs": f"mlm-docs {args.doc_lengths} tokens",
                                        "mixed": f"mixed {args.queries} queries + {args.docs} docs"})[k]
                                       for k in args.sections) + "; "
           "vs_fastest_peer > 1 = faster than every peer; GEMM peak " + _peak_text({"float32": peak}), rows,
           ["section", "batch", "path", "seconds", "tokens_per_s", "fraction_of_gemm_peak", "vs_fastest_peer",
            "max_err", "note"], out,
           extra={"gemm_peak": peak, "skipped": skipped, "full_run": full_run, **extra,
                  "wall_s": time.perf_counter() - t_start, "args": {k: str(v) for k, v in vars(args).items()}})


if __name__ == "__main__":
    main()
