"""Data-parallel MeZO vs DDP backprop: bytes sent per step, and steps/s at DP=1 and DP=2.

Every case runs under ``torch.distributed.run`` (DP=1: one process, no all-reduce) with the same
global batch (``--global-batch``, split over the processes) of SST-2 prompts (k=512 split),
roberta-base shape (random weights) or ``--model tiny``:

- ``mezo``: MeZOTrainer on the engine (full-parameter, or LoRA r=8 on query+value);
- ``ddp``: transformers' Trainer, AdamW backprop on ``RobertaForMaskedLM`` (full, or PEFT LoRA,
  same task head), i.e. DistributedDataParallel's gradient all-reduce.

Bytes, two ways, on rank 0: *measured* -- the TCP payload bytes rank 0's own sockets sent during
the timed steps (``ss -ti``'s ``bytes_sent`` per socket of the process: gloo's pairs, the store),
divided by the steps; and *payload* -- what the step hands to all-reduce: counted by MeZO's reducer
(``2n + 1`` float64), computed for DDP as trainable parameters x 4 bytes (fp32 gradients; a ring
all-reduce over N processes sends 2(N-1)/N of it per process, i.e. all of it at N=2).

    python benchmarks/bench_mezo_dp.py [--model base|tiny] [--steps 4] [--global-batch 32]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SST2_SPLITS, TOKENIZER_DIR, report, roberta_base_checkpoint, tiny_checkpoint  # noqa: E402

# kind-mode-processes; "1x1": one process with one thread (torchrun gives each of N > 1 processes one)
CASES = [("mezo", "full", "1"), ("mezo", "full", "1x1"), ("mezo", "full", "2"), ("mezo", "lora", "1"),
         ("mezo", "lora", "1x1"), ("mezo", "lora", "2"), ("ddp", "full", "1"), ("ddp", "full", "2"),
         ("ddp", "lora", "2")]
WARMUP_STEPS = 1


def socket_bytes_sent(pid: int) -> int:
    """TCP payload bytes sent so far by the open sockets of ``pid`` (``ss -tinp``)."""
    out = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True, timeout=30).stdout.splitlines()
    total = 0
    for head, info in zip(out[::2], out[1::2]):
        if f"pid={pid}," in head:
            m = re.search(r"bytes_sent:(\d+)", info)
            total += int(m.group(1)) if m else 0
    return total


def worker(kind: str, mode: str, ckpt: str, steps: int, global_batch: int, out: str) -> None:
    import torch
    from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from sglang_hf_bridge.training import (
        MeZOTrainer,
        MeZOTrainingArguments,
        PromptClassifier,
        PromptCollator,
        PromptTemplate,
        load_lmbff_tsv,
    )

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    template = PromptTemplate()
    rows = load_lmbff_tsv(SST2_SPLITS / "512-42" / "train.tsv")
    rows = rows[: global_batch * (steps + WARMUP_STEPS)]
    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=global_batch // world,
                  max_steps=steps + WARMUP_STEPS, save_strategy="no", logging_strategy="no", report_to=[],
                  use_cpu=True, remove_unused_columns=False, disable_tqdm=True, seed=0)
    lora = dict(r=8, lora_alpha=16, target_modules=["query", "value"])
    timing = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == WARMUP_STEPS:
                timing["t0"], timing["b0"] = time.perf_counter(), socket_bytes_sent(os.getpid())

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == WARMUP_STEPS + steps:
                timing["t1"], timing["b1"] = time.perf_counter(), socket_bytes_sent(os.getpid())

    from peft import LoraConfig

    if kind == "mezo":
        from sglang_hf_bridge import SGLangRobertaForMaskedLM

        args = MeZOTrainingArguments(learning_rate=1e-6, zo_eps=1e-3, **common)  # the launcher's world first
        model = SGLangRobertaForMaskedLM.from_pretrained(ckpt, enable_lora=mode == "lora")
        if mode == "lora":
            model.add_adapter(LoraConfig(**lora))
        clf = PromptClassifier(model, template.label_word_ids(tok), tok.mask_token_id)
        trainer = MeZOTrainer(model=clf, args=args, train_dataset=rows, data_collator=PromptCollator(tok, template),
                              callbacks=[Clock()])
        trained = trainer.zo_num_parameters()
    else:
        from transformers import RobertaForMaskedLM

        args = TrainingArguments(learning_rate=1e-5, ddp_find_unused_parameters=False, **common)
        hf = RobertaForMaskedLM.from_pretrained(ckpt)
        if mode == "lora":
            from peft import get_peft_model

            hf = get_peft_model(hf, LoraConfig(**lora))
        clf = PromptClassifier(hf, template.label_word_ids(tok), tok.mask_token_id)
        trainer = Trainer(model=clf, args=args, train_dataset=rows, data_collator=PromptCollator(tok, template),
                          callbacks=[Clock()])
        trained = sum(p.numel() for p in clf.parameters() if p.requires_grad)
    trainer.train()
    seconds = timing["t1"] - timing["t0"]
    result = {"case": f"{kind}-{mode}", "dp": world, "steps": steps, "global_batch": global_batch,
              "trained_parameters": int(trained), "steps_per_s": steps / seconds,
              "measured_bytes_sent_per_step_rank0": (timing["b1"] - timing["b0"]) / steps if world > 1 else 0,
              "threads_per_process": torch.get_num_threads()}
    if kind == "mezo":
        reducer = trainer.zo_data_parallel
        result["payload_bytes_per_step"] = reducer.payload_bytes / reducer.calls if reducer else 0
        result["payload_source"] = "counted (MeZO reducer: 2n+1 float64 per all-reduce)"
    else:
        result["payload_bytes_per_step"] = 4 * trained if world > 1 else 0
        result["payload_source"] = "computed (trainable parameters x 4 bytes, DDP gradient all-reduce)"
    if kind == "mezo":
        model.close()
    if rank == 0:
        Path(out).write_text(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["base", "tiny"], default="base")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--global-batch", type=int, default=32)
    ap.add_argument("--cases", default=",".join(f"{k}-{m}-{n}" for k, m, n in CASES))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "mezo_dp.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, mode = args.worker.split("-")
        return worker(kind, mode, args.ckpt, args.steps, args.global_batch, args.result)

    from sglang_hf_bridge.process import free_local_port

    ckpt = roberta_base_checkpoint() if args.model == "base" else tiny_checkpoint()
    rows = []
    for case in args.cases.split(","):
        kind, mode, n = case.split("-")
        env = dict(os.environ, GLOO_SOCKET_IFNAME="lo")
        if n == "1x1":
            n, env["OMP_NUM_THREADS"] = "1", "1"
        result = Path(tempfile.mkdtemp()) / "result.json"
        load = os.getloadavg()[0]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", n, "--master_addr", "127.0.0.1",
               "--master_port", str(free_local_port()), __file__, "--worker", f"{kind}-{mode}", "--ckpt", str(ckpt),
               "--steps", str(args.steps), "--global-batch", str(args.global_batch), "--result", str(result)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
        if r.returncode != 0 or not result.exists():
            print(r.stdout[-3000:], r.stderr[-3000:])
            raise SystemExit(f"case {case} failed")
        row = json.loads(result.read_text())
        row["load_average_before"] = round(load, 2)
        print(row, flush=True)
        rows.append(row)
    report(f"bench_mezo_dp: {args.model} model, global batch {args.global_batch}, {args.steps} timed steps, "
           f"{os.cpu_count()} CPU cores", rows,
           ["case", "dp", "trained_parameters", "steps_per_s", "payload_bytes_per_step",
            "measured_bytes_sent_per_step_rank0", "threads_per_process", "load_average_before"],
           Path(args.out), extra={"notes": [
               "payload: MeZO counted by its reducer; DDP computed (trainable params x 4 B)",
               "measured: TCP payload bytes sent by rank 0's sockets (ss -ti bytes_sent) per timed step",
               "DP=1 runs one process with 2 threads (1x1: 1 thread); DP=2 two processes with 1 thread each",
               "load_average_before: the host's 1-minute load before the case (other jobs share this host)"]})


if __name__ == "__main__":
    main()
