"""Shared pieces of the benchmarks: inputs, the random roberta-base-shaped checkpoint, timing,
and the table + JSON report. Every benchmark measures the HF baseline in the same run."""

from __future__ import annotations

import csv
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SGLANG_HF_BRIDGE_DATA", REPO / "data"))
TOKENIZER_DIR = DATA / "tokenizers" / "roberta-base"
SST2_SPLITS = DATA / "sst2" / "k-shot"
SST2_TEST = SST2_SPLITS / "16-42" / "test.tsv"
TEMPLATE = "{sentence} It was <mask>."


def read_sentences(path: Path = SST2_TEST) -> List[str]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r[0].strip() for r in rows[1:]]


def prompts(limit: int = 0) -> List[str]:
    sentences = read_sentences()
    if limit:
        sentences = sentences[:limit]
    return [TEMPLATE.format(sentence=s) for s in sentences]


def roberta_base_checkpoint(seed: int = 0) -> Path:
    """A random-weight roberta-base-shaped RobertaForMaskedLM saved under the temp dir (cached)."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    path = Path(tempfile.gettempdir()) / f"sglang-hf-bridge-bench-roberta-base-{seed}"
    if not (path / "model.safetensors").exists():
        config = RobertaConfig.from_pretrained(str(TOKENIZER_DIR))
        torch.manual_seed(seed)
        RobertaForMaskedLM(config).save_pretrained(path)
    return with_tokenizer_files(path)


def with_tokenizer_files(path: Path) -> Path:
    """The RoBERTa tokenizer's files beside a checkpoint, as published ones carry them (the mask id)."""
    for name in ("tokenizer_config.json", "vocab.json", "merges.txt"):
        if not (path / name).exists():
            shutil.copyfile(TOKENIZER_DIR / name, path / name)
    return path


def tiny_checkpoint() -> Path:
    """A tiny random RoBERTa (hidden 64, 2 layers, the real vocabulary) with logits spread like a
    trained model's (``initializer_range=0.3``), saved under the temp dir (cached): for smoke runs and
    for measuring what is not compute."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    path = Path(tempfile.gettempdir()) / "sglang-hf-bridge-bench-roberta-tiny-v2"
    if not (path / "model.safetensors").exists():
        config = RobertaConfig(vocab_size=50265, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=128, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                               bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5, initializer_range=0.3)
        torch.manual_seed(0)
        RobertaForMaskedLM(config).save_pretrained(path)
    return with_tokenizer_files(path)


def time_it(fn: Callable[[], object], repeats: int = 1, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def environment() -> Dict[str, object]:
    from sglang_hf_bridge.engine.gemm import host_description

    host = host_description()
    return {
        "cpu": host["cpu"],
        "simd": host["simd"],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def report(title: str, rows: List[Dict[str, object]], columns: List[str], out: Path, extra=None) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"title": title, "environment": environment(), "rows": rows}
    payload.update(extra or {})
    out.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {out}")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return "" if v is None else str(v)
