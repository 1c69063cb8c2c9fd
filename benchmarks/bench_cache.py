"""The caches that are valid for an encoder: frozen-layer states under MeZO, repeated evaluation.

roberta-base shape (random weights), LoRA r=8 on query+value of the top 2 of 12 layers
(``layers_to_transform=[10, 11]``), 64-prompt batches of the k=512 SST-2 split (1,024 prompts,
16 batches an epoch), label words " terrible"/" great". One run measures:

* MeZO step time (paired +/- batch) on the engine without the frozen-layer cache, and with it
  after the first epoch (every example's states entering layer 10 are then cached), plus the
  first epoch itself; the cache's bytes; the same MeZO step on PEFT + transformers;
* evaluation of 256 test prompts twice: transformers, the engine without caches, and the
  engine with the whole-sequence result cache (second run served from it).

    python benchmarks/bench_cache.py [--steps 5] [--eval 256]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SST2_SPLITS, TOKENIZER_DIR, report, roberta_base_checkpoint  # noqa: E402

LORA = dict(r=8, lora_alpha=16, target_modules=["query", "value"], layers_to_transform=[10, 11])
SPLIT = SST2_SPLITS / "512-42"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="timed MeZO steps per case")
    ap.add_argument("--eval", type=int, default=256, help="test prompts in the repeated evaluation")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cache.json")
    args = ap.parse_args()

    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, RobertaForMaskedLM

    from sglang_hf_bridge import SGLangRobertaForMaskedLM
    from sglang_hf_bridge.training import (
        MeZOTrainer,
        MeZOTrainingArguments,
        PromptClassifier,
        PromptCollator,
        PromptTemplate,
        load_lmbff_tsv,
    )

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    template = PromptTemplate()
    collate = PromptCollator(tok, template)
    label_ids = template.label_word_ids(tok)
    train = load_lmbff_tsv(SPLIT / "train.tsv")
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(train), generator=g).tolist()
    batches = [collate([train[i] for i in order[k : k + 64]]) for k in range(0, len(order) - 63, 64)]
    test = collate(load_lmbff_tsv(SPLIT / "test.tsv")[: args.eval])
    ckpt = roberta_base_checkpoint()
    rows, extra = [], {}

    def mezo_args(cache: bool, paired: bool = True):
        return MeZOTrainingArguments(output_dir="/tmp/bench-cache", learning_rate=1e-3, zo_eps=1e-3, report_to=[],
                                     use_cpu=True, remove_unused_columns=False, zo_trainable="lora",
                                     zo_paired_batch=paired, zo_frozen_layer_cache=cache)

    def steps(trainer, clf, which):
        times = []
        for b in which:
            t0 = time.perf_counter()
            trainer.training_step(clf, dict(b))
            times.append(time.perf_counter() - t0)
        return times

    def median(xs):
        return sorted(xs)[len(xs) // 2]

    # --- transformers + PEFT: the baseline MeZO step and evaluation --------------------------------
    hf = RobertaForMaskedLM.from_pretrained(ckpt, attn_implementation="sdpa").eval()
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(**LORA)).eval()
    clf = PromptClassifier(peft_model, label_ids, tok.mask_token_id)
    trainer = MeZOTrainer(model=clf, args=mezo_args(False))
    hf_step = median(steps(trainer, clf, batches[: args.steps + 1])[1:])
    rows.append({"case": "mezo step, PEFT + transformers", "seconds": hf_step})
    hf_clf = PromptClassifier(hf, label_ids, tok.mask_token_id)
    t0 = time.perf_counter()
    for _ in range(2):
        with torch.no_grad():
            for k in range(0, args.eval, 64):
                hf_clf.label_logits(test["input_ids"][k : k + 64], test["attention_mask"][k : k + 64])
    hf_eval = (time.perf_counter() - t0) / 2
    del hf, peft_model, trainer

    # --- the engine ----------------------------------------------------------------------------
    model = SGLangRobertaForMaskedLM.from_pretrained(ckpt)
    model.add_adapter(LoraConfig(**LORA), adapter_name="task")
    clf = PromptClassifier(model, label_ids, tok.mask_token_id)
    trainer = MeZOTrainer(model=clf, args=mezo_args(False))
    plain = median(steps(trainer, clf, batches[: args.steps + 1])[1:])
    rows.append({"case": "mezo step, engine, no cache", "seconds": plain})

    trainer = MeZOTrainer(model=clf, args=mezo_args(True))
    first_epoch = steps(trainer, clf, batches)
    stats = model.cache_stats()["frozen_layer"]
    rows.append({"case": "mezo step, engine, frozen-layer cache, first epoch (fills it)",
                 "seconds": sum(first_epoch) / len(first_epoch)})
    cached = median(steps(trainer, clf, batches[: args.steps]))
    rows.append({"case": "mezo step, engine, frozen-layer cache, after the first epoch", "seconds": cached})
    extra["frozen_layer_cache"] = dict(model.cache_stats()["frozen_layer"], mib=stats["bytes"] / 2**20)
    seq_trainer = MeZOTrainer(model=clf, args=mezo_args(True, paired=False))
    seq = median(steps(seq_trainer, clf, batches[: args.steps]))
    rows.append({"case": "mezo step, engine, frozen-layer cache, sequential +/- passes", "seconds": seq})
    model.disable_frozen_layer_cache()

    def evaluate():
        for k in range(0, args.eval, 64):
            clf.label_logits(test["input_ids"][k : k + 64], test["attention_mask"][k : k + 64])

    model.set_adapter("task")
    t0 = time.perf_counter()
    evaluate()
    evaluate()
    no_cache_eval = (time.perf_counter() - t0) / 2
    model.enable_result_cache(256)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        evaluate()
        times.append(time.perf_counter() - t0)
    extra["result_cache"] = dict(model.cache_stats()["result"], mib=model.cache_stats()["result"]["bytes"] / 2**20)
    model.close()

    rows += [
        {"case": f"evaluate {args.eval} prompts, transformers", "seconds": hf_eval},
        {"case": f"evaluate {args.eval} prompts, engine, no cache", "seconds": no_cache_eval},
        {"case": f"evaluate {args.eval} prompts, engine, result cache, first run", "seconds": times[0]},
        {"case": f"evaluate {args.eval} prompts, engine, result cache, repeated", "seconds": times[1]},
    ]
    for r in rows:
        base = hf_step if r["case"].startswith("mezo") else hf_eval
        r["speedup_vs_hf"] = base / r["seconds"]
    extra["frozen_cache_speedup_vs_no_cache"] = plain / cached
    extra["result_cache_speedup_vs_no_cache"] = no_cache_eval / times[1]
    report(f"bench_cache: roberta-base shape, LoRA on layers 10-11, 64-prompt batches of k=512 "
           f"({len(batches)} per epoch), CPU", rows, ["case", "seconds", "speedup_vs_hf"], args.out, extra)
    print(f"frozen-layer cache: {plain / cached:.2f}x faster per step than no cache; holds "
          f"{extra['frozen_layer_cache']['mib']:.1f} MiB for {stats['entries']} examples")
    print(f"result cache: repeated evaluation {no_cache_eval / times[1]:.0f}x faster; holds "
          f"{extra['result_cache']['mib']:.2f} MiB")


if __name__ == "__main__":
    main()
