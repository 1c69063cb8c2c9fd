"""Soak: 10,000 calls of varied shapes (forward / compute_mlm_logits, 1-8 rows, 2-64 tokens, base
and adapter rows), 1,000 adapter load/delete cycles and 1,000 cache toggles in ONE process, on a
small random RoBERTa. Checks after every call that request rows and KV slots are back in the pool,
samples RSS, and at the end compares answers with a fresh model on the same checkpoint.

    python benchmarks/soak.py                       # the full soak (a few minutes on 2 cores)
    python benchmarks/soak.py --calls 1000 --cycles 100 --toggles 100
"""

from __future__ import annotations

import argparse
import copy
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, report  # noqa: E402

VOCAB = 1000  # small: forward returns [B, T, vocab] logits, and the soak is about the engine


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def random_batch(rng: random.Random):
    rows = rng.randint(1, 8)
    lengths = [rng.randint(2, 64) for _ in range(rows)]
    ids = torch.full((rows, max(lengths)), 1, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.tensor([0] + [rng.randint(3, VOCAB - 2) for _ in range(n - 2)] + [2])
        ids[r, rng.randint(1, n - 2) if n > 2 else 0] = VOCAB - 1  # the mask token
    return ids, (ids != 1).long()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=10_000)
    ap.add_argument("--cycles", type=int, default=1_000)
    ap.add_argument("--toggles", type=int, default=1_000)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "soak.json")
    args = ap.parse_args()

    from peft import LoraConfig, get_peft_model
    from transformers import RobertaConfig, RobertaForMaskedLM

    from sglang_hf_bridge import SGLangRobertaForMaskedLM

    path = Path(tempfile.mkdtemp(prefix="sglang-hf-bridge-soak-"))
    torch.manual_seed(0)
    hf = RobertaForMaskedLM(RobertaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=128, max_position_embeddings=130)).eval()
    hf.save_pretrained(path)
    get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                 init_lora_weights=False)).save_pretrained(path / "adapter")
    rng = random.Random(0)
    probes = [random_batch(rng) for _ in range(8)]
    leaks, rss = 0, []
    t0 = time.perf_counter()
    with SGLangRobertaForMaskedLM.from_pretrained(path, max_loras=4) as model:
        capacity = model.engine_pool_capacity()
        model.load_adapter(path / "adapter", adapter_name="kept")
        for i in range(args.calls):
            ids, mask = random_batch(rng)
            names = [rng.choice(["kept", "__base__"]) for _ in range(ids.shape[0])]
            if i % 2:
                with torch.no_grad():
                    model(ids, attention_mask=mask, adapter_names=names)
            else:
                model.compute_mlm_logits(ids, mask, vocab_ids=[5, 6, 7], adapter_names=names)
            leaks += model.engine_pool_stats() != capacity
            if i % 500 == 0:
                rss.append(rss_mib())
        calls_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(args.cycles):
            model.load_adapter(path / "adapter", adapter_name="churn")
            model.delete_adapter("churn")
        cycles_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        for i in range(args.toggles):
            model.enable_result_cache(4)
            model.enable_frozen_layer_cache(1, 4)
            model.compute_mlm_logits(*probes[i % len(probes)], vocab_ids=[5, 6, 7])
            model.disable_result_cache()
            model.disable_frozen_layer_cache()
        toggles_s = time.perf_counter() - t2
        rss.append(rss_mib())
        end = [model.compute_mlm_logits(*p, vocab_ids=[5, 6, 7], adapter_names=["kept"] * p[0].shape[0])
               for p in probes]
        tables_ok = sorted(model.peft_config) == ["kept"] and len(model.runtime.adapters.adapters) == 1
        final_pools = model.engine_pool_stats() == capacity
    with SGLangRobertaForMaskedLM.from_pretrained(path, max_loras=4) as fresh:
        fresh.load_adapter(path / "adapter", adapter_name="kept")
        ref = [fresh.compute_mlm_logits(*p, vocab_ids=[5, 6, 7], adapter_names=["kept"] * p[0].shape[0])
               for p in probes]
    worst = max((a - b).abs().max().item() for a, b in zip(end, ref))
    warm = rss[1] if len(rss) > 1 else rss[0]
    rows = [
        {"phase": f"{args.calls} calls, varied shapes", "seconds": calls_s, "leaky calls": leaks},
        {"phase": f"{args.cycles} adapter load/delete cycles", "seconds": cycles_s},
        {"phase": f"{args.toggles} cache toggles (+ a call each)", "seconds": toggles_s},
        {"phase": "end: pools full, tables consistent", "ok": final_pools and tables_ok},
        {"phase": "end: max |answer - fresh model's|", "value": worst},
        {"phase": "RSS MiB after warm-up -> end", "value": f"{warm:.1f} -> {rss[-1]:.1f}"},
    ]
    report("Soak: one process, one model", rows, ["phase", "seconds", "leaky calls", "ok", "value"], args.out,
           extra={"rss_mib_samples": rss})
    if leaks or not final_pools or not tables_ok or worst > 1e-5:
        raise SystemExit("soak FAILED")


if __name__ == "__main__":
    main()
