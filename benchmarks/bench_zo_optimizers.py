"""Zeroth-order methods compared at equal forward passes: SST-2 accuracy, seconds per step, memory.

all-MiniLM-L6-v2 (the packaged weights, converted to a RoBERTa masked LM), SST-2 k=512 (LM-BFF
split 512-42), prompt "<sentence> it was [MASK] ." with label words terrible/great, batch 64,
eps 1e-3. Every ``MeZOTrainingArguments(zo_optimizer=...)`` method gets the same budget of forward
passes (a HiZOO step costs 3, ZO-SGD-Cons 5, the others 2), the same starting weights/adapter and
the same batch order per seed; test accuracy is measured at fixed forward-pass checkpoints.

* lora: LoRA r=8 on query+value of layers 3-5, linear lr decay over the method's own steps (the
  setting of docs/training.md "Results"); the frozen-layer cache keeps the states entering layer 3.
* full: full-parameter MeZO on the top K encoder layers + LM head (``--full-top-layers``,
  ``zo_top_layers``), constant lr, as docs/training.md's full-parameter run.

Seconds per step and peak RSS are measured separately, one quiet subprocess per mode x method
(warm-up steps, then timed steps), with the method's state size. The lr per method: LR_RULE below.

Defaults (sized on this 2-core CPU, 2026-12-07: sgd 0.12 s/step LoRA, 0.11 s/step top-2 full, with
the frozen-layer cache warm): 1000 forward passes per run (500 MeZO steps), full = top 2 layers + LM
head, seeds 1 2 3 (lora) and 1 2 (full), 9 methods: 45 runs, ~57 min + ~5 min of timing = ~60 min.
A CPU shared with other work makes it slower (2-5x per step seen while sizing).

    python3 benchmarks/bench_zo_optimizers.py                    # everything above, ~60 min
    python3 benchmarks/bench_zo_optimizers.py --sections timing  # s/step + memory only, ~5 min
    python3 benchmarks/bench_zo_optimizers.py --sections accuracy --modes lora --methods sgd adam
        --seeds 1 --forwards 400 --lr-sweep adam=3e-4,1e-3    # (one line) an lr sweep, ~4 min
    python3 benchmarks/bench_zo_optimizers.py --smoke --out /tmp/zo.json --plot /tmp/zo.png  # ~2.5 min
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # mezo_sst2.default_model
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package, when not installed
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SST2_SPLITS, environment  # noqa: E402

ALL_METHODS = ["sgd", "sign", "momentum", "adam", "sparse", "hizoo", "conservative", "lozo", "lozo-m"]
# Forward passes per step when the method object does not say (loss_at_theta / conservative do).
FORWARDS_FALLBACK = {"hizoo": 3, "conservative": 5}
LORA_LAYERS, LORA_RANK, EPS, MOMENTUM = [3, 4, 5], 8, 1e-3, 0.9
SGD_LR = {"lora": 3e-3, "full": 1e-5}  # docs/training.md "Results": the MeZO lr that worked per mode
# Per-method lr, relative to SGD_LR unless absolute. Why:
# * sparse, hizoo, conservative: an SGD step on g * direction, so MeZO's lr (HiZOO's H stays ~1
#   at alpha 1e-8; Sparse MeZO's authors raise lr, we do not tune per method).
# * momentum: torch SGD momentum, buf = beta buf + d (no dampening) sums ~1/(1-beta) steps: lr (1-beta).
# * lozo, lozo-m: U V^T (rank r, no scaling, as the authors' code) has E[entry^2] = r, so g and the
#   direction each grow by sqrt(r) and the step by r: lr / r gives MeZO's expected step. LOZO-M's
#   momentum is an average, M = beta M + (1-beta) g U (zo_methods.ZOLowRankMomentum): no (1-beta).
# * sign: g is replaced by +-1, so lr = MeZO's lr x median |g| of this mode's sgd run (first seed):
#   the same typical step. SIGN_G_FALLBACK (measured in a short sgd run) when sgd is not run first.
# * adam: its per-entry step is ~0.2-1 x lr whatever the scale of g (m / sqrt(v)), MeZO's is lr |g| |z|.
#   Swept (seed 1, 400 forwards, 2026-12-07; --lr-sweep): lora 1e-4 / 3e-4 / 1e-3 -> 53.6 / 54.5 / 57.5 %
#   (sgd 57.5, zero-shot 53.7); full top-2 1e-6 / 1e-5 / 5e-5 -> 53.9 / 54.4 / 57.1 % (sgd 57.0). Both
#   picks are ~2.5 x MeZO's lr x median |g| and the top of their grids (a larger lr was not tried).
#   Sign swept too: lora 1.2e-3 (2.6 x the rule's) -> 56.7 % vs 56.1 %: within seed noise, rule kept.
LOZO_RANK = 4  # MeZOTrainingArguments.zo_lozo_rank's default (the authors' RoBERTa scripts)
LR_RULE = {"sgd": 1.0, "sparse": 1.0, "hizoo": 1.0, "conservative": 1.0, "lozo": 1 / LOZO_RANK,
           "lozo-m": 1 / LOZO_RANK, "momentum": 1 - MOMENTUM, "sign": "median|g|", "adam": {"lora": 1e-3, "full": 5e-5}}
SIGN_G_FALLBACK = {"lora": 0.134, "full": 1.92}  # median |g| of 60-step sgd runs, 2026-12-07
# For the estimate, 2 cores, 2026-12-07 (shared CPU, noisy): sgd s/step with the frozen-layer cache warm
# (lora; full per top layer), s per evaluation of 872 cached sentences, s per mode to fill the cache
# (zero-shot evaluation + the first epoch) and per run (trainer start, resets).
SGD_S_PER_STEP = {"lora": 0.13, "full": 0.06}
EVAL_S, CACHE_FILL_S, RUN_OVERHEAD_S, TIMING_CHILD_S = 1.5, 80.0, 3.0, 18.0
TIMING_CHILD_TIMEOUT_S = 900
DEFAULT_FORWARDS, DEFAULT_TOP_LAYERS = 1000, 2  # sized for ~60 min (module docstring)


def lr_for(method: str, mode: str, median_abs_g: Optional[float]) -> float:
    rule = LR_RULE.get(method, 1.0)
    if rule == "median|g|":
        return SGD_LR[mode] * (median_abs_g if median_abs_g else SIGN_G_FALLBACK[mode])
    return rule[mode] if isinstance(rule, dict) else SGD_LR[mode] * rule


def forwards_per_step(method_obj) -> int:
    """2 (l+, l-), +1 for the loss at theta (HiZOO), 5 for ZO-SGD-Cons (l+, l-, and the candidates)."""
    if getattr(method_obj, "conservative", False):
        return FORWARDS_FALLBACK["conservative"]
    if getattr(method_obj, "loss_at_theta", False):
        return 3
    return FORWARDS_FALLBACK.get(getattr(method_obj, "name", ""), 2)


def clear_method_state(trainer, method) -> None:
    """The engine keeps a method's state per set of trained weights ("base" for full-parameter) across
    trainers; MeZOTrainer now clears it before step 1 too (mezo.py), this keeps the benchmark exact
    whatever version it runs on."""
    trainer.zo_target().set_method_state({}, method)


def state_mib(trainer, method) -> float:
    """The method's state for the trained tensors, as the trainer announces it (``state_bytes``)."""
    return method.state_bytes({n: tuple(t.shape) for n, t in trainer.zo_target().full_tensors().items()}) / 2**20


def gemm_path(engine) -> Optional[str]:
    """The GEMM path the engine chose at load (measured once per host, cached): a timing depends on it."""
    choice = getattr(engine.runtime, "gemm_choice", None)
    return getattr(choice, "path", None)


# ---- model, data, engine ------------------------------------------------------------------------
def load_setup(mode: str, eval_limit: int):
    from mezo_sst2 import default_model  # examples/: the converted MiniLM (cached under the temp dir)
    from peft import LoraConfig
    from transformers import AutoTokenizer

    from sglang_hf_bridge import SGLangRobertaForMaskedLM
    from sglang_hf_bridge.training import PromptClassifier, PromptCollator, PromptTemplate, load_lmbff_tsv

    model_dir = default_model()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    template = PromptTemplate("{sentence} it was {mask} .", ("terrible", "great"))
    split = SST2_SPLITS / "512-42"
    train_rows, test_rows = load_lmbff_tsv(split / "train.tsv"), load_lmbff_tsv(split / "test.tsv")
    test_rows = test_rows[:eval_limit] if eval_limit else test_rows
    collator = PromptCollator(tok, template)
    engine = SGLangRobertaForMaskedLM.from_pretrained(model_dir, enable_lora=mode == "lora", max_lora_rank=16,
                                                      dtype=torch.float32)
    clf = PromptClassifier(engine, template.label_word_ids(tok), tok.mask_token_id)
    lora_cfg = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=["query", "value"],
                          layers_to_transform=LORA_LAYERS)
    test_batches = [collator(test_rows[i:i + 128]) for i in range(0, len(test_rows), 128)]

    def evaluate() -> float:
        correct = 0
        with torch.no_grad():
            for b in test_batches:
                correct += int((clf.label_logits(b["input_ids"], b["attention_mask"]).argmax(-1) == b["labels"]).sum())
        return correct / len(test_rows)

    return dict(engine=engine, clf=clf, collator=collator, train_rows=train_rows, evaluate=evaluate,
                lora_cfg=lora_cfg, n_test=len(test_rows))


def training_args(mode: str, method: str, lr: float, steps: int, seed: int, a, out_dir: str):
    from sglang_hf_bridge.training import MeZOTrainingArguments

    return MeZOTrainingArguments(
        output_dir=out_dir, zo_optimizer=method, learning_rate=lr, max_steps=steps, seed=seed, zo_eps=EPS,
        per_device_train_batch_size=a.batch_size, lr_scheduler_type="linear" if mode == "lora" else "constant",
        zo_trainable="lora" if mode == "lora" else "all", zo_top_layers=0 if mode == "lora" else a.full_top_layers,
        zo_momentum=MOMENTUM, zo_lozo_rank=LOZO_RANK, report_to=[], save_strategy="no", logging_steps=10**9,
        use_cpu=True, remove_unused_columns=False, disable_tqdm=True)


def checkpoint_callback(evaluate: Callable[[], float], fpps: int, every: int, max_steps: int, points: List[dict]):
    """Evaluate when steps x forwards/step first crosses each multiple of ``every`` (and at the end)."""
    from transformers import TrainerCallback

    class _Checkpoints(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.next, self.t0, self.eval_s = every, time.perf_counter(), 0.0

        def on_step_end(self, args, state, control, **kw):
            forwards = state.global_step * fpps
            if forwards >= self.next or state.global_step == max_steps:
                t = time.perf_counter()
                acc = evaluate()
                self.eval_s += time.perf_counter() - t
                train_s = time.perf_counter() - self.t0 - self.eval_s
                points.append({"forwards": forwards, "step": state.global_step, "accuracy": acc, "train_s": train_s})
                print(f"    {forwards:6d} fw  step {state.global_step:5d}  acc {acc:.4f}  ({train_s:.0f} s)")
                while self.next <= forwards:
                    self.next += every

    return _Checkpoints()


# ---- section 1: accuracy at equal forward passes ----------------------------------------------------
def run_accuracy(mode: str, variants: List[Tuple[str, str, Optional[float]]], a) -> dict:
    """Every (label, method, lr or None: the LR_RULE) variant x seed from the same start, one engine."""
    from sglang_hf_bridge.training import MeZOTrainer

    s = load_setup(mode, a.eval_limit)
    engine = s["engine"]
    zero_shot = s["evaluate"]()  # B = 0 LoRA / untouched weights: the same start for every seed
    print(f"[{mode}] zero-shot accuracy {zero_shot:.4f} on {s['n_test']} test sentences", flush=True)
    init_adapters: Dict[int, Dict[str, torch.Tensor]] = {}
    init_weights: Optional[Dict[str, torch.Tensor]] = None
    if mode == "lora":
        for seed in a.seeds:  # one starting adapter per seed, shared by every method
            torch.manual_seed(seed)
            engine.add_adapter(copy.deepcopy(s["lora_cfg"]), adapter_name="sst2")
            init_adapters[seed] = {k: v.clone() for k, v in engine.adapter_state_dict("sst2").items()}
            engine.delete_adapter("sst2")
    else:
        init_weights = {k: v.clone() for k, v in engine.state_dict().items()}
    runs, median_abs_g = [], None
    for label, method, lr_set in variants:
        for seed in a.seeds:
            if mode == "lora":  # a fresh adapter id: fresh method state on the engine, exact start
                engine.load_adapter(adapter_name="sst2", adapter_state_dict=init_adapters[seed],
                                    peft_config=copy.deepcopy(s["lora_cfg"]))
                now = engine.adapter_state_dict("sst2")
                assert all(torch.equal(now[k], v) for k, v in init_adapters[seed].items()), "reset was not exact"
            lr = lr_set if lr_set is not None else lr_for(method, mode, median_abs_g)
            with tempfile.TemporaryDirectory() as work:
                args = training_args(mode, method, lr, 1, seed, a, work)
                fpps = forwards_per_step(args.zo_method())
                steps = a.forwards // fpps
                args = training_args(mode, method, lr, steps, seed, a, work)
                points = [{"forwards": 0, "step": 0, "accuracy": zero_shot, "train_s": 0.0}]
                cb = checkpoint_callback(s["evaluate"], fpps, a.forwards // a.eval_points, steps, points)
                trainer = MeZOTrainer(model=s["clf"], args=args, train_dataset=s["train_rows"],
                                      data_collator=s["collator"], callbacks=[cb])
                clear_method_state(trainer, args.zo_method())
                print(f"[{mode}] {label} seed {seed}: lr {lr:.3g}, {steps} steps x {fpps} forwards", flush=True)
                trainer.train()
            grads = [abs(g) for r in trainer.zo_history for g in r["projected_grads"]]
            losses, tenth = [statistics.fmean(r["losses"]) for r in trainer.zo_history], max(1, steps // 10)
            run = {"mode": mode, "label": label, "method": method, "seed": seed, "lr": lr, "forwards_per_step": fpps,
                   "max_steps": steps, "points": points, "median_abs_projected_grad": statistics.median(grads),
                   "train_loss_first_last_tenth": [statistics.fmean(losses[:tenth]), statistics.fmean(losses[-tenth:])],
                   "trained_parameters": trainer.zo_num_parameters()}
            kept = [r["kept"] for r in trainer.zo_history if "kept" in r]  # ZO-SGD-Cons: -1, 0 (theta) or 1
            if kept:
                run["conservative_kept_counts"] = {str(k): kept.count(k) for k in sorted(set(kept))}
            runs.append(run)
            if label == "sgd" and median_abs_g is None:
                median_abs_g = run["median_abs_projected_grad"]
            if mode == "lora":
                engine.delete_adapter("sst2")
            else:  # write the trained tensors back (only those: the frozen-layer cache stays valid)
                names = trainer.zo_target().names
                engine.load_state_dict({n: init_weights[n] for n in names}, strict=False)
                now = engine.state_dict()
                assert all(torch.equal(now[n], init_weights[n]) for n in names), "reset was not exact"
    cache = engine.cache_stats()["frozen_layer"]  # misses ~ distinct sentences: the resets kept it valid
    gemm = gemm_path(engine)
    engine.close()
    return {"mode": mode, "zero_shot": zero_shot, "runs": runs, "trained_parameters": runs[-1]["trained_parameters"],
            "sgd_median_abs_projected_grad": median_abs_g, "frozen_layer_cache": cache, "gemm": gemm}


# ---- section 2: seconds per step and peak memory (one subprocess per case) ----------------------------
def timing_child(mode: str, method: str, a) -> dict:
    from sglang_hf_bridge.training import MeZOTrainer

    s = load_setup(mode, 1)
    if mode == "lora":
        torch.manual_seed(0)
        s["engine"].add_adapter(copy.deepcopy(s["lora_cfg"]), adapter_name="sst2")
    with tempfile.TemporaryDirectory() as work:
        args = training_args(mode, method, lr_for(method, mode, None), 10**6, 0, a, work)
        trainer = MeZOTrainer(model=s["clf"], args=args)
        rows = s["train_rows"]
        batches = [s["collator"](rows[i * a.batch_size:(i + 1) * a.batch_size]) for i in range(a.timing_batches)]
        times = []
        for i in range(a.timing_warmup + a.timing_steps):  # warm-up fills the frozen-layer cache
            t0 = time.perf_counter()
            trainer.training_step(s["clf"], dict(batches[i % len(batches)]))
            times.append(time.perf_counter() - t0)
        method_obj = args.zo_method()
        row = {"mode": mode, "method": method, "s_per_step": statistics.median(times[a.timing_warmup:]),
               "forwards_per_step": forwards_per_step(method_obj), "state_mib": state_mib(trainer, method_obj),
               "trained_parameters": trainer.zo_num_parameters(),
               "s_per_step_min": min(times[a.timing_warmup:]),  # less hurt by other work on the CPU
               "gemm": gemm_path(s["engine"]),
               # this process only: the engine runs in it at tp_size 1 (its short-lived forked helpers
               # report the parent's pages as their ru_maxrss, so RUSAGE_CHILDREN is not added)
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    s["engine"].close()
    return row


def run_timing(modes: List[str], methods: List[str], a) -> List[dict]:
    rows = []
    for mode in modes:
        for method in methods:
            cmd = [sys.executable, __file__, "--_timing-child", mode, method] + [
                x for k in ("batch_size", "full_top_layers", "timing_steps", "timing_warmup", "timing_batches")
                for x in (f"--{k.replace('_', '-')}", str(getattr(a, k)))]
            try:  # bounded: a stuck child is reported and skipped
                r = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO), timeout=TIMING_CHILD_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print(f"[timing] {mode} {method}: no result within {TIMING_CHILD_TIMEOUT_S} s, skipped", flush=True)
                continue
            line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
            if r.returncode or not line:
                print(f"[timing] {mode} {method} failed:\n{r.stderr[-2000:]}", flush=True)
                continue
            rows.append(json.loads(line[-1][7:]))
            print(f"[timing] {mode} {method}: {rows[-1]['s_per_step']:.3f} s/step (min "
                  f"{rows[-1]['s_per_step_min']:.3f}), peak "
                  f"{rows[-1]['peak_rss_mib']:.0f} MiB, state {rows[-1]['state_mib']:.2f} MiB", flush=True)
    for row in rows:
        sgd = next((r for r in rows if r["mode"] == row["mode"] and r["method"] == "sgd"), None)
        row["s_per_step_vs_sgd"] = row["s_per_step"] / sgd["s_per_step"] if sgd else None
        row["peak_rss_vs_sgd"] = row["peak_rss_mib"] / sgd["peak_rss_mib"] if sgd else None
    return rows


# ---- summary, table, plot ----------------------------------------------------------------------------
def mean_std(xs: List[float]) -> List[float]:
    return [statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0]


def summarize(accuracy: List[dict], timing: List[dict]) -> List[dict]:
    """Per mode x variant: accuracy over seeds (mean, std), joined with the method's timing row."""
    summary = []
    for mode in dict.fromkeys([r["mode"] for r in accuracy] + [t["mode"] for t in timing]):
        acc = next((r for r in accuracy if r["mode"] == mode), {"runs": []})
        labels = dict.fromkeys([r["label"] for r in acc["runs"]] + [t["method"] for t in timing if t["mode"] == mode])
        sgd_final = None
        for label in labels:
            runs = [r for r in acc["runs"] if r["label"] == label]
            row = {"mode": mode, "label": label, "method": runs[0]["method"] if runs else label}
            if runs:
                finals = [r["points"][-1]["accuracy"] for r in runs]
                row.update(forwards_per_step=runs[0]["forwards_per_step"], steps_at_budget=runs[0]["max_steps"],
                           lr=runs[0]["lr"], seeds=len(runs), final_accuracy=mean_std(finals),
                           best_accuracy=mean_std([max(p["accuracy"] for p in r["points"]) for r in runs]),
                           gain_over_zero_shot_points=100 * (statistics.fmean(finals) - acc["zero_shot"]))
                sgd_final = row["final_accuracy"][0] if label == "sgd" else sgd_final
                row["final_vs_sgd_points"] = None if sgd_final is None else 100 * (row["final_accuracy"][0] - sgd_final)
            t = next((t for t in timing if t["mode"] == mode and t["method"] == row["method"]), None)
            if t:
                row.update({k: t[k] for k in ("s_per_step", "s_per_step_vs_sgd", "peak_rss_mib", "peak_rss_vs_sgd",
                                              "state_mib", "forwards_per_step")})
            summary.append(row)
    return summary


def mode_label(mode: str, a) -> str:
    if mode == "lora":
        return f"LoRA r={LORA_RANK} query+value, layers {LORA_LAYERS}, lr linear decay"
    return f"full-parameter, top {a.full_top_layers} layers + LM head, constant lr"


def print_tables(summary: List[dict], a) -> str:
    def f(x, fmt: str = "{}") -> str:
        return "" if x is None else fmt.format(x)

    text = []
    for mode in dict.fromkeys(r["mode"] for r in summary):
        text += [f"\n### {mode}: {mode_label(mode, a)}; budget {a.forwards} forward passes\n",
                 "| method | forwards/step | steps at budget | lr | final acc mean ± std (seeds) | vs sgd (points) "
                 "| s/step | vs sgd | peak RSS MiB | vs sgd | state MiB |", "|" + "---|" * 11]
        for r in (r for r in summary if r["mode"] == mode):
            acc = r.get("final_accuracy")
            acc_s = f"{100 * acc[0]:.1f} ± {100 * acc[1]:.1f} ({r['seeds']})" if acc else ""
            text.append(f"| {r['label']} | {f(r.get('forwards_per_step'))} | {f(r.get('steps_at_budget'))} | "
                        f"{f(r.get('lr'), '{:.3g}')} | {acc_s} | {f(r.get('final_vs_sgd_points'), '{:+.1f}')} | "
                        f"{f(r.get('s_per_step'), '{:.3f}')} | {f(r.get('s_per_step_vs_sgd'), '{:.2f}x')} | "
                        f"{f(r.get('peak_rss_mib'), '{:.0f}')} | {f(r.get('peak_rss_vs_sgd'), '{:.2f}x')} | "
                        f"{f(r.get('state_mib'), '{:.2f}')} |")
    print("\n".join(text), flush=True)
    return "\n".join(text)


def plot(accuracy: List[dict], path: Path, a) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(accuracy), figsize=(7.5 * len(accuracy), 5), squeeze=False)
    for ax, acc in zip(axes[0], accuracy):
        for label in dict.fromkeys(r["label"] for r in acc["runs"]):
            runs = [r for r in acc["runs"] if r["label"] == label]
            n = min(len(r["points"]) for r in runs)
            x = [runs[0]["points"][i]["forwards"] for i in range(n)]
            ys = [[r["points"][i]["accuracy"] for r in runs] for i in range(n)]
            line, = ax.plot(x, [statistics.fmean(y) for y in ys], marker="o", label=label)
            ax.fill_between(x, [min(y) for y in ys], [max(y) for y in ys], color=line.get_color(), alpha=0.15)
        seeds = sorted({r["seed"] for r in acc["runs"]})
        ax.set(xlabel="forward passes", ylabel="test accuracy",
               title=f"{acc['mode']}: {mode_label(acc['mode'], a)}\nseeds {seeds}: mean, shaded min-max")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("SST-2 k=512 (LM-BFF 512-42), all-MiniLM-L6-v2, equal forward-pass budget", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def estimate_s(variants, a, timing: List[dict]) -> float:
    """The accuracy section's time: per run steps x s/step (measured by the timing section, else
    SGD_S_PER_STEP x forwards/step / 2), the evaluations, the cache fill per mode."""
    total = 0.0
    for mode in a.modes:
        total += CACHE_FILL_S
        for _, method, _ in variants:
            t = next((t for t in timing if t["mode"] == mode and t["method"] == method), None)
            fpps = FORWARDS_FALLBACK.get(method, 2)
            sgd_step = SGD_S_PER_STEP[mode] * (a.full_top_layers if mode == "full" else 1)
            per_step = t["s_per_step"] if t else sgd_step * fpps / 2
            evals = a.eval_points * EVAL_S * (a.eval_limit or 872) / 872
            total += len(seeds_for(mode, a)) * ((a.forwards // fpps) * per_step + evals + RUN_OVERHEAD_S)
    return total


def seeds_for(mode: str, a) -> List[int]:
    return a.seeds if mode == "lora" else a.seeds[:a.full_seeds]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", choices=["lora", "full"], default=["lora", "full"])
    ap.add_argument("--methods", nargs="+", help=f"default: every one of {ALL_METHODS} the library has")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--full-seeds", type=int, default=2, help="full mode uses the first N of --seeds")
    ap.add_argument("--forwards", type=int, default=DEFAULT_FORWARDS, help="forward-pass budget per run")
    ap.add_argument("--eval-points", type=int, default=4, help="evaluations per run, every forwards/N")
    ap.add_argument("--eval-limit", type=int, default=0, help="first N test sentences (0: all 872)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--full-top-layers", type=int, default=DEFAULT_TOP_LAYERS,
                    help="full mode: train the top K encoder layers + LM head (zo_top_layers)")
    ap.add_argument("--sections", nargs="+", choices=["accuracy", "timing"], default=["accuracy", "timing"])
    ap.add_argument("--lr-override", nargs="*", default=[], metavar="METHOD=LR", help="instead of LR_RULE")
    ap.add_argument("--lr-sweep", nargs="*", default=[], metavar="METHOD=LR,LR",
                    help="extra runs of METHOD at these lr (labelled METHOD@LR), beside its LR_RULE run")
    ap.add_argument("--timing-steps", type=int, default=10)
    ap.add_argument("--timing-warmup", type=int, default=2, help="untimed steps (they fill the frozen-layer cache)")
    ap.add_argument("--timing-batches", type=int, default=2, help="distinct batches cycled (as training cycles 8)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "zo_optimizers.json")
    ap.add_argument("--plot", type=Path, default=REPO / "docs" / "results" / "zo_optimizers.png")
    ap.add_argument("--smoke", action="store_true", help="~2 min: sgd + momentum, 12 forwards, 32 test sentences")
    ap.add_argument("--_timing-child", nargs=2, dest="timing_child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.timing_child:
        print("RESULT " + json.dumps(timing_child(*a.timing_child, a)), flush=True)
        return
    if a.smoke:
        a.methods, a.seeds, a.full_seeds, a.forwards, a.eval_points = ["sgd", "momentum"], [1], 1, 12, 2
        a.eval_limit, a.batch_size, a.timing_steps, a.timing_warmup, a.timing_batches = 32, 8, 2, 1, 1
    from sglang_hf_bridge.training.zo_methods import METHODS as exists
    methods = [m for m in (a.methods or ALL_METHODS) if m in exists]
    missing = [m for m in (a.methods or ALL_METHODS) if m not in exists]
    if missing:
        print(f"not in this library (skipped): {missing}", flush=True)
    overrides = {k: float(v) for k, v in (o.split("=", 1) for o in a.lr_override)}
    variants = [(m, m, overrides.get(m)) for m in methods]
    for m, lrs in (o.split("=", 1) for o in a.lr_sweep):
        variants += [(f"{m}@{float(lr):g}", m, float(lr)) for lr in lrs.split(",")]
    timing_s = TIMING_CHILD_S * len(a.modes) * len(methods) if "timing" in a.sections else 0.0
    accuracy_s = estimate_s(variants, a, []) if "accuracy" in a.sections else 0.0
    print(f"estimated run time: ~{(timing_s + accuracy_s) / 60:.0f} min (timing ~{timing_s / 60:.0f}, accuracy "
          f"~{accuracy_s / 60:.0f}; 2 idle cores; other work on the CPU slows it)", flush=True)
    t_start = time.perf_counter()
    timing = run_timing(a.modes, methods, a) if "timing" in a.sections else []
    accuracy = []
    if "accuracy" in a.sections:
        print(f"accuracy section: ~{estimate_s(variants, a, timing) / 60:.0f} min estimated now "
              f"({'measured s/step' if timing else 'constants'}; {len(variants)} variants, modes {a.modes}, "
              f"{a.forwards} forwards per run)", flush=True)
        for mode in a.modes:
            mode_args = copy.copy(a)
            mode_args.seeds = seeds_for(mode, a)
            accuracy.append(run_accuracy(mode, variants, mode_args))
    summary = summarize(accuracy, timing)
    table = print_tables(summary, a)
    payload = {"title": "zeroth-order methods on SST-2 k=512 (all-MiniLM-L6-v2), equal forward passes",
               "host": environment(), "args": {k: str(v) for k, v in vars(a).items()}, "methods": methods,
               "skipped_methods": missing, "modes": {m: mode_label(m, a) for m in a.modes},
               "lr_rule": {"sgd_lr": SGD_LR, "rule": LR_RULE, "overrides": overrides, "sweep": a.lr_sweep,
                           "why": "LR_RULE's comment in benchmarks/bench_zo_optimizers.py"},
               "eps": EPS, "momentum": MOMENTUM, "summary": summary, "timing": timing, "accuracy": accuracy,
               "table_markdown": table, "wall_s": time.perf_counter() - t_start,
               "note": "2-core CPU shared with other work while measured: timings are noisy"}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(payload, indent=2))
    if accuracy:
        plot(accuracy, a.plot, a)
    host = payload["host"]
    print(f"\nhost: {host['cpu']} ({host['simd']}), {host['threads']} threads, {host['cpu_count']} CPUs")
    print(f"wrote {a.out}" + (f" and {a.plot}" if accuracy else "") + f" in {payload['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
