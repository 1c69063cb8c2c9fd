"""MeZO on SST-2 with the engine (full-parameter or LoRA), optionally against baselines.

Prompt "<sentence> it was [MASK] ." with label words "terrible"/"great" (the WordPiece tokenizer
of all-MiniLM-L6-v2, converted to a RoBERTa masked LM by convert_bert_checkpoint.py). Evaluates
zero-shot and every --eval-every steps on the 872 test sentences; writes metrics JSON and a PNG
(loss and accuracy against steps; accuracy against training wall-clock time).

    python examples/mezo_sst2.py --mode lora --steps 600
    python examples/mezo_sst2.py --mode lora --baselines --time-budget 600   # + HF MeZO, backprop
    python examples/mezo_sst2.py --mode lora --lora-layers 4,5               # top layers: frozen-layer cache
    python examples/mezo_sst2.py --smoke                                     # seconds, for CI
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SGLANG_HF_BRIDGE_DATA", REPO / "data"))
SST2_SPLITS = DATA / "sst2" / "k-shot"
sys.path.insert(0, str(Path(__file__).resolve().parent))


def default_model() -> Path:
    from convert_bert_checkpoint import convert, packaged_minilm

    out = Path(tempfile.gettempdir()) / "sglang-hf-bridge-minilm-roberta"
    if not (out / "model.safetensors").exists():
        convert(packaged_minilm(), out, check=False)
    return out


class Recorder:
    """TrainerCallback: accuracy every N steps; wall time counts training only (eval excluded)."""

    def __init__(self, evaluate, every: int, budget_s: float):
        from transformers import TrainerCallback

        rec = self

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                rec.t0, rec.eval_s = time.perf_counter(), 0.0

            def on_step_end(self, args, state, control, **kw):
                wall = time.perf_counter() - rec.t0 - rec.eval_s
                if state.global_step % every == 0 or wall > budget_s:
                    t = time.perf_counter()
                    rec.points.append({"step": state.global_step, "wall_s": wall, "accuracy": evaluate()})
                    rec.eval_s += time.perf_counter() - t
                    acc = rec.points[-1]["accuracy"]
                    print(f"  step {state.global_step:5d}  {wall:7.1f} s  acc {acc:.4f}", flush=True)
                if wall > budget_s:
                    control.should_training_stop = True

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    rec.losses.append({"step": state.global_step, "loss": float(logs["loss"])})

        self.points, self.losses, self.callback = [], [], _CB()


def run_method(name, clf, args_kwargs, rows, collator, evaluate, every, budget, trainer_cls, args_cls):
    rec = Recorder(evaluate, every, budget)
    rec.points.append({"step": 0, "wall_s": 0.0, "accuracy": evaluate()})
    print(f"{name}: zero-shot accuracy {rec.points[0]['accuracy']:.4f}", flush=True)
    args = args_cls(**args_kwargs)
    trainer = trainer_cls(model=clf, args=args, train_dataset=rows, data_collator=collator, callbacks=[rec.callback])
    trainer.train()
    return {"method": name, "points": rec.points, "losses": rec.losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="RoBERTa-family masked-LM dir (default: converted MiniLM)")
    ap.add_argument("--mode", choices=["lora", "full"], default="lora")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, help="default 1e-3 (lora) / 1e-5 (full)")
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--lr-scheduler", default="constant", help="TrainingArguments.lr_scheduler_type (over --steps)")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--lora-layers", help="comma-separated layers_to_transform (default: every layer)")
    ap.add_argument("--top-layers", type=int, default=0, help="full mode: train only the top k layers + LM head")
    ap.add_argument("--no-frozen-cache", action="store_true",
                    help="do not cache the states entering the lowest trained layer (engine only)")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-limit", type=int, default=0, help="evaluate on the first N test sentences (0 = all)")
    ap.add_argument("--split", default="512-42",
                    help="an LM-BFF k-shot split: 512-42 or 16-42 (shipped in data/sst2/k-shot) or a "
                         "directory with train.tsv and test.tsv")
    ap.add_argument("--time-budget", type=float, default=1e9, help="stop each method after this many training seconds")
    ap.add_argument("--baselines", action="store_true",
                    help="also MeZO on plain transformers (same seeds) and backprop")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="engine weights' dtype (LoRA MeZO keeps fp32 master copies of the adapter)")
    ap.add_argument("--out", type=Path, default=REPO / "examples" / "output" / "mezo_sst2")
    ap.add_argument("--smoke", action="store_true", help="tiny run for CI")
    a = ap.parse_args()
    if a.smoke:
        a.steps, a.batch_size, a.eval_every, a.eval_limit = 4, 8, 2, 32
    lr = a.lr or (1e-3 if a.mode == "lora" else 1e-5)

    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForMaskedLM, AutoTokenizer, Trainer, TrainingArguments

    from sglang_hf_bridge import SGLangRobertaForMaskedLM
    from sglang_hf_bridge.training import (
        MeZOTrainer,
        MeZOTrainingArguments,
        PromptClassifier,
        PromptCollator,
        PromptTemplate,
        load_lmbff_tsv,
    )

    model_dir = a.model or default_model()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    template = PromptTemplate("{sentence} it was {mask} .", ("terrible", "great"))
    label_ids = template.label_word_ids(tok)
    data = Path(a.split) if Path(a.split).is_dir() else SST2_SPLITS / a.split
    train_rows, test_rows = load_lmbff_tsv(data / "train.tsv"), load_lmbff_tsv(data / "test.tsv")
    if a.eval_limit:
        test_rows = test_rows[: a.eval_limit]
    collator = PromptCollator(tok, template)
    test_batches = [collator(test_rows[i : i + 128]) for i in range(0, len(test_rows), 128)]
    layers = [int(x) for x in a.lora_layers.split(",")] if a.lora_layers else None
    lora_cfg = LoraConfig(r=a.lora_rank, lora_alpha=2 * a.lora_rank, target_modules=["query", "value"],
                          layers_to_transform=layers)

    def evaluator(clf):
        def evaluate():
            correct = 0
            with torch.no_grad():
                for b in test_batches:
                    predicted = clf.label_logits(b["input_ids"], b["attention_mask"]).argmax(-1)
                    correct += int((predicted == b["labels"]).sum())
            return correct / len(test_rows)
        return evaluate

    common = dict(per_device_train_batch_size=a.batch_size, max_steps=a.steps, seed=a.seed, report_to=[],
                  save_strategy="no", logging_steps=max(1, a.eval_every // 5), use_cpu=True,
                  remove_unused_columns=False, disable_tqdm=True)
    mezo_kwargs = dict(common, learning_rate=lr, zo_eps=a.eps, lr_scheduler_type=a.lr_scheduler,
                       zo_trainable="lora" if a.mode == "lora" else "all", zo_top_layers=a.top_layers,
                       zo_frozen_layer_cache=not a.no_frozen_cache)
    results = []
    with tempfile.TemporaryDirectory() as work:
        engine = SGLangRobertaForMaskedLM.from_pretrained(model_dir, max_lora_rank=max(16, a.lora_rank),
                                                            dtype=getattr(torch, a.dtype))
        if a.mode == "lora":
            torch.manual_seed(a.seed)
            engine.add_adapter(copy.deepcopy(lora_cfg), adapter_name="sst2")
            init_adapter = {k: v.clone() for k, v in engine.adapter_tensors("sst2").items()}
        clf = PromptClassifier(engine, label_ids, tok.mask_token_id)
        results.append(run_method(f"MeZO ({a.mode}) on the SGLang engine", clf, dict(mezo_kwargs, output_dir=work),
                                  train_rows, collator, evaluator(clf), a.eval_every, a.time_budget,
                                  MeZOTrainer, MeZOTrainingArguments))
        engine.close()
        if a.baselines:
            hf = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
            if a.mode == "lora":
                hf = get_peft_model(hf, copy.deepcopy(lora_cfg)).eval()
                with torch.no_grad():  # the engine's starting adapter: same init, same seeds
                    for n, p in hf.named_parameters():
                        key = n.replace(".default", "")
                        if key in init_adapter:
                            p.copy_(init_adapter[key])
            hclf = PromptClassifier(hf, label_ids, tok.mask_token_id)
            results.append(run_method(f"MeZO ({a.mode}) on transformers", hclf, dict(mezo_kwargs, output_dir=work),
                                      train_rows, collator, evaluator(hclf), a.eval_every, a.time_budget,
                                      MeZOTrainer, MeZOTrainingArguments))
            bp = AutoModelForMaskedLM.from_pretrained(model_dir)
            bclf = PromptClassifier(bp, label_ids, tok.mask_token_id)
            results.append(run_method("backprop AdamW 3e-5 (full) on transformers", bclf,
                                      dict(common, output_dir=work, learning_rate=3e-5, max_steps=min(a.steps, 120),
                                           per_device_train_batch_size=min(a.batch_size, 32)),
                                      train_rows, collator, evaluator(bclf), max(1, a.eval_every // 5), a.time_budget,
                                      Trainer, TrainingArguments))
    a.out.mkdir(parents=True, exist_ok=True)
    payload = {"args": {k: str(v) for k, v in vars(a).items()}, "lr": lr, "results": results}
    (a.out / "metrics.json").write_text(json.dumps(payload, indent=2))
    plot(results, a.out / "mezo_sst2.png")
    print(f"wrote {a.out / 'metrics.json'} and {a.out / 'mezo_sst2.png'}")


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc, ax_wall) = plt.subplots(1, 3, figsize=(16, 4.5))
    for r in results:
        if r["losses"]:
            ax_loss.plot([p["step"] for p in r["losses"]], [p["loss"] for p in r["losses"]], label=r["method"])
        accuracy = [p["accuracy"] for p in r["points"]]
        ax_acc.plot([p["step"] for p in r["points"]], accuracy, marker="o", label=r["method"])
        ax_wall.plot([p["wall_s"] for p in r["points"]], accuracy, marker="o", label=r["method"])
    ax_loss.set(xlabel="step", ylabel="train loss", title="loss")
    ax_acc.set(xlabel="step", ylabel="test accuracy", title="accuracy vs steps")
    ax_wall.set(xlabel="training wall-clock (s)", ylabel="test accuracy", title="accuracy vs time")
    for ax in (ax_loss, ax_acc, ax_wall):
        ax.grid(alpha=0.3)
    ax_wall.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
