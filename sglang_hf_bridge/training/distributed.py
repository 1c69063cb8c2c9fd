"""Data-parallel MeZO over torch.distributed (``torchrun`` / ``accelerate launch``).

Every process owns one engine (any ``tp_size``) and a full copy of the weights. The Trainer's own
distributed sampler gives each process its shard of every global batch; each process computes
the objective's sums on its shard at theta + eps z and theta - eps z (same seed, so the same z,
on every process); ONE all-reduce of ``2n + 1`` float64 values (n-SPSA: the two sums per
direction, and the number of items) gives every process the same global means, hence the same
projected gradients, and every process applies the identical update. No weights, gradients or
activations cross the network: the traffic per step is independent of the model's size.

Two worlds in one process. torch.distributed keeps one DEFAULT process group per process; SGLang
0.5.23 builds its parallel runtime on it and refuses a default group it did not size, and the
Trainer (accelerate's ``PartialState``) builds the launcher's N-process world as the default. Here
the launcher's world is the default -- the Trainer's samplers, ``evaluate()`` gathers, barriers and
rank-0 checkpoints work as in any DDP run -- and SGLang's world is an ordinary group beside it
(:func:`sglang_hf_bridge.compat.install_world_beside_default`). Whichever is created first,
:meth:`MeZOTrainingArguments._setup_devices` (the moment the Trainer builds its world) arranges it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import List, Optional, Sequence

from ..errors import DataParallelError  # defined in errors.py; importable from here too

logger = logging.getLogger(__name__)

__all__ = ["DataParallelError", "DataParallelReducer", "Launch", "keep_launcher_timeout", "launch_from_env",
           "prepare_default_group", "reducer_for_trainer"]


@dataclass(frozen=True)
class Launch:
    """This process's place in a multi-process launch, as torchrun / accelerate set it."""

    rank: int
    world_size: int
    local_rank: int
    master: Optional[str]


def launch_from_env(environ=None) -> Optional[Launch]:
    """The launch this process belongs to (``WORLD_SIZE`` > 1 as torchrun, ``accelerate launch`` and
    the multi-node recipes set it), or None for a single process."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
    except ValueError:
        raise DataParallelError(f"WORLD_SIZE={env.get('WORLD_SIZE')!r} is not a number") from None
    if world <= 1:
        return None
    if "RANK" not in env:
        raise DataParallelError(f"WORLD_SIZE={world} is set but RANK is not: launch with torchrun or accelerate "
                                "launch (they set RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every process)")
    master = f"{env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')}" if "MASTER_ADDR" in env else None
    return Launch(rank=int(env["RANK"]), world_size=world, local_rank=int(env.get("LOCAL_RANK", "0")), master=master)


def prepare_default_group() -> Optional[Launch]:
    """Before the Trainer builds the launcher's world (``TrainingArguments._setup_devices``): let
    SGLang's world live beside it. Engines built earlier have made SGLang's 1-process world the
    default group; it is set aside, so accelerate's ``PartialState`` builds the N-process world
    from the launcher's environment instead of adopting SGLang's. Engines built later build their
    world with the default slot emptied for the moment. No-op outside a multi-process launch."""
    launch = launch_from_env()
    if launch is None:
        return None
    from .. import compat

    compat.install_world_beside_default()
    if compat.set_aside_sglang_world():
        logger.info("rank %d: SGLang's world set aside; the launcher's %d-process world becomes the default group",
                    launch.rank, launch.world_size)
    return launch


def keep_launcher_timeout(timeout_s: float) -> None:
    """A ``tp_size > 1`` engine bounds the collectives of the process's default group to its
    worker timeout once it has started (``compat.bound_collective_timeouts``, 30 s by default);
    under a launch that group is the launcher's, whose barriers may wait for a checkpoint being
    written. Put the Trainer's ``ddp_timeout`` back."""
    import torch.distributed as dist

    from .. import compat

    if dist.is_initialized() and not compat.sglang_world_is_default():
        dist.set_timeout(timedelta(seconds=float(timeout_s)), compat.default_process_group())


class DataParallelReducer:
    """The one all-reduce per MeZO step, on a gloo group of the launcher's world (created
    collectively: every process builds its trainer). Counts what it sends."""

    def __init__(self, rank: int, world_size: int, timeout_s: float):
        import torch.distributed as dist

        self.rank, self.world_size, self.timeout_s = rank, world_size, float(timeout_s)
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout_s))
        self.calls = 0
        self.payload_bytes = 0  # the tensors handed to all_reduce, summed over calls
        self.seconds = 0.0

    def sum(self, values: Sequence[float], step: int) -> List[float]:
        """Element-wise sum of ``values`` over every process (float64), or :class:`DataParallelError`
        naming the step when another process is gone or silent."""
        import torch
        import torch.distributed as dist

        from .. import compat

        tensor = torch.tensor(list(values), dtype=torch.float64)
        start = time.perf_counter()
        try:
            dist.all_reduce(tensor, group=self.group)
        except Exception as exc:
            if not compat.is_collective_failure(exc):
                raise
            raise DataParallelError(
                f"MeZO data parallel, rank {self.rank} of {self.world_size}: the all-reduce of step {step}'s "
                f"projected gradient failed -- another process of the run died or stopped answering "
                f"(timeout {self.timeout_s:.0f} s, TrainingArguments.ddp_timeout). This process stops too; "
                f"its weights are the ones before step {step}. Cause: {str(exc).strip()[:300]}") from exc
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.payload_bytes += tensor.numel() * tensor.element_size()
        return tensor.tolist()

    def close(self) -> None:
        import torch.distributed as dist

        if self.group is not None:
            try:
                dist.destroy_process_group(self.group)
            except Exception:  # noqa: BLE001 - the world is already gone
                pass
            self.group = None


def reducer_for_trainer(trainer) -> Optional[DataParallelReducer]:
    """The reducer a MeZOTrainer needs (None for one process), or :class:`DataParallelError` for a
    launch it would not train correctly."""
    import torch.distributed as dist

    from .. import compat

    args = trainer.args
    launch = launch_from_env()
    world = args.world_size
    if world <= 1:
        if launch is not None:
            raise DataParallelError(
                f"this process was launched as rank {launch.rank} of {launch.world_size} (WORLD_SIZE), but the "
                "Trainer sees a single process: each process would train alone on the whole data set. "
                "Build the MeZOTrainingArguments inside the launched script (not before the launch) and do not "
                "initialise torch.distributed yourself; see docs/distributed-mezo.md")
        return None
    problems = []
    if not dist.is_initialized() or dist.get_world_size() != world:
        problems.append(f"the default process group is not the Trainer's {world}-process world")
    if compat.sglang_world_is_default():
        problems.append("the default process group is SGLang's engine world, not the launcher's")
    if launch is not None and launch.world_size != world:
        problems.append(f"WORLD_SIZE={launch.world_size} but the Trainer sees {world} processes")
    if args.deepspeed or args.fsdp:
        problems.append("DeepSpeed / FSDP shard weights and gradients; MeZO keeps a full copy per process")
    config = args.accelerator_config
    if config is not None and not getattr(config, "even_batches", True):
        problems.append("accelerator_config.even_batches=False gives processes different numbers of steps")
    if problems:
        raise DataParallelError("MeZOTrainer cannot train this distributed launch correctly: " + "; ".join(problems))
    return DataParallelReducer(args.process_index, world, timeout_s=args.ddp_timeout)
