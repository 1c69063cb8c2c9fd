"""LoRA throughput: SGLang's per-row adapters vs PEFT on transformers, one run.

roberta-base shape (random weights), 64 SST-2 prompts, rank-8 adapters on query+value (B != 0).
Engine: base only; one adapter; four adapters mixed per row (one batch) -- both for ``forward``
(full logits, like PEFT) and ``compute_mlm_logits``. PEFT: one adapter (unmerged) and the same
four adapters mixed with ``adapter_names``. Prints a table and writes JSON.

    python benchmarks/bench_lora.py
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, TOKENIZER_DIR, prompts, report, roberta_base_checkpoint, time_it  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "lora.json")
    args = ap.parse_args()

    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, RobertaForMaskedLM

    from sglang_hf_bridge import SGLangRobertaForMaskedLM

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    batch = tok(prompts(args.num_prompts), return_tensors="pt", padding=True)
    ckpt = roberta_base_checkpoint()
    hf = RobertaForMaskedLM.from_pretrained(ckpt, attn_implementation="sdpa").eval()
    work = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    names = ["a0", "a1", "a2", "a3"]
    peft_model = None
    for i, name in enumerate(names):
        torch.manual_seed(i)
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False)
        single = get_peft_model(copy.deepcopy(hf), cfg).eval()
        single.save_pretrained(work / name)
        if peft_model is None:
            peft_model = get_peft_model(copy.deepcopy(hf), cfg, adapter_name=name).eval()
            peft_model.load_adapter(str(work / name), adapter_name=name)
        else:
            peft_model.load_adapter(str(work / name), adapter_name=name)
    peft_model.set_adapter("a0")

    ours = SGLangRobertaForMaskedLM.from_pretrained(ckpt, max_lora_rank=8, max_loras=4)
    for name in names:
        ours.load_adapter(work / name, adapter_name=name)
    plain = SGLangRobertaForMaskedLM.from_pretrained(ckpt, enable_lora=False)  # LoRA machinery off
    B = batch["input_ids"].shape[0]
    mixed = [names[i % 4] for i in range(B)]
    ids, mask = batch["input_ids"], batch["attention_mask"]

    def engine_forward(adapter_names):
        def go():
            with torch.inference_mode():
                ours(ids, attention_mask=mask, adapter_names=adapter_names).logits
        return go

    def engine_mlm(adapter_names):
        return lambda: ours.compute_mlm_logits(ids, mask, mask_token_id=tok.mask_token_id, adapter_names=adapter_names)

    def peft_forward(adapter_names):
        def go():
            with torch.inference_mode():
                kwargs = {"adapter_names": adapter_names} if adapter_names else {}
                peft_model(input_ids=ids, attention_mask=mask, **kwargs).logits
        return go

    def plain_forward():
        with torch.inference_mode():
            plain(ids, attention_mask=mask).logits

    cases = [
        ("engine forward", "enable_lora=False (no LoRA layers)", plain_forward),
        ("engine forward", "base only", engine_forward(["__base__"] * B)),
        ("engine forward", "one adapter", engine_forward(["a0"] * B)),
        ("engine forward", "4 adapters mixed per row", engine_forward(mixed)),
        ("engine compute_mlm_logits", "base only", engine_mlm(["__base__"] * B)),
        ("engine compute_mlm_logits", "one adapter", engine_mlm(["a0"] * B)),
        ("engine compute_mlm_logits", "4 adapters mixed per row", engine_mlm(mixed)),
        ("PEFT on transformers (sdpa)", "one adapter, unmerged", peft_forward(None)),
        ("PEFT on transformers (sdpa)", "4 adapters mixed per row", peft_forward(mixed)),
    ]
    times = {}
    for path, setting, fn in cases:
        times[(path, setting)] = time_it(fn, repeats=args.repeats, warmup=1)
        print(f"{path} / {setting}: {times[(path, setting)]:.2f} s", flush=True)
    ours.close()
    plain.close()
    peft_mixed = times[("PEFT on transformers (sdpa)", "4 adapters mixed per row")]
    rows = []
    for (path, setting), seconds in times.items():
        base = times.get((path, "base only"))
        rows.append({
            "path": path, "setting": setting, "seconds": seconds,
            "prompts_per_s": B / seconds,
            "vs_own_base_only": (seconds / base) if base else None,
            "speedup_vs_peft_mixed": peft_mixed / seconds,
        })
    report(f"bench_lora: {B} SST-2 prompts, roberta-base shape, rank 8 on query+value, CPU", rows,
           ["path", "setting", "seconds", "prompts_per_s", "vs_own_base_only", "speedup_vs_peft_mixed"], args.out)


if __name__ == "__main__":
    main()
