"""MeZOTrainer: zeroth-order SGD (Malladi et al., 2023, Algorithm 1) as a drop-in HF Trainer.

Per step and per sample i: seed s; theta += eps z; l+ ; theta -= 2 eps z; l- ; theta += eps z
(restore); g = (l+ - l-) / (2 eps); then theta -= lr (g z / n + wd theta) with z regenerated
from s. The last restore and its update share one pass over z (three z passes per step, not
four). No gradient buffers, no optimizer state, no second copy of the weights. For a LoRA
adapter on the engine the +eps z and -eps z passes run as two scratch adapters in ONE engine
batch (rows tagged per adapter).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from transformers import Trainer, TrainingArguments

from ..engine import HEAD, base_layer_of, hf_parameter_slices, min_layer_of, rank_copy_adapter
from ..process import deferred_interrupts
from . import distributed
from .prompts import PromptClassifier, float32_cross_entropy
from .zo import EngineAdapterTarget, EngineWeightsTarget, TorchParametersTarget

PLUS, MINUS = "__zo_plus__", "__zo_minus__"
IGNORE_INDEX = -100  # transformers' label for "no loss here"
_TRAINABLE_LINE = "  Number of trainable parameters = "


class _TrainableCountFilter(logging.Filter):
    """Trainer logs ``get_model_param_count(model, trainable_only=True)``: the torch parameters
    with ``requires_grad`` (0 on the engine, whose weights are not torch parameters; all of them
    for a torch model, whatever MeZO trains). Put the count of what MeZO trains in that line."""

    def __init__(self, trainer: "MeZOTrainer"):
        super().__init__()
        self.trainer = trainer

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(_TRAINABLE_LINE) and not record.args:
            record.msg = f"{_TRAINABLE_LINE}{self.trainer.zo_num_parameters():,} (trained by MeZO)"
        return True


def negative_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per item: -1 where the arg-max of ``logits`` is the label, else 0 (items labelled -100 are
    left out). A non-differentiable objective: MeZO needs only its values."""
    keep = labels != IGNORE_INDEX
    return -(logits.argmax(-1)[keep] == labels[keep]).to(torch.float64)


class ModelLoss:
    """The objective that is the model's own ``loss`` output (cross-entropy for its labels)."""

    def __repr__(self) -> str:
        return "cross_entropy"


MODEL_LOSS = ModelLoss()
ObjectiveFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OBJECTIVES: Dict[str, Union[ModelLoss, ObjectiveFn]] = {
    "cross_entropy": MODEL_LOSS,
    "negative_accuracy": negative_accuracy,
}
Objective = Union[None, str, ObjectiveFn]


def resolve_objective(objective: Objective) -> Union[ModelLoss, ObjectiveFn]:
    """``zo_objective`` as what to compute: None is the model's loss, a name is looked up."""
    if objective is None:
        return MODEL_LOSS
    return OBJECTIVES[objective] if isinstance(objective, str) else objective


def _objective_name(objective: Objective) -> str:
    if objective is None or isinstance(objective, str):
        return objective or "cross_entropy"
    return f"{getattr(objective, '__module__', '?')}.{getattr(objective, '__qualname__', repr(objective))}"


def _items(labels: Optional[torch.Tensor], batch_size: int) -> int:
    """What the loss averages over: labelled items (transformers' -100 convention), else rows."""
    return int((labels != IGNORE_INDEX).sum()) if labels is not None else batch_size


def objective_sum(objective: Objective, logits: torch.Tensor, labels: torch.Tensor) -> Tuple[float, int]:
    """``(sum, count)`` of a callable objective's values on one batch: one value per example (or
    item) is summed; a single value is taken as the mean over the batch's labelled items. Sums and
    counts, not means, so that shards of different sizes add up to the global mean."""
    fn = resolve_objective(objective)
    values = torch.as_tensor(fn(logits, labels))
    if values.dim() == 0:
        count = _items(labels, logits.shape[0])
        return float(values) * count, count
    return float(values.detach().to(torch.float64).sum()), values.numel()


@dataclass
class MeZOTrainingArguments(TrainingArguments):
    zo_eps: float = field(default=1e-3, metadata={"help": "perturbation scale epsilon"})
    zo_num_samples: int = field(default=1, metadata={"help": "n of n-SPSA: directions per step"})
    zo_trainable: str = field(default="auto",
                              metadata={"help": "'all' weights, 'lora' (the active adapter), 'head' (the task head and "
                                                        "pooler only), or 'auto'"})
    zo_paired_batch: bool = field(default=True, metadata={"help": "LoRA on the engine: +/- passes in one batch"})
    zo_top_layers: int = field(default=0, metadata={
        "help": "full-parameter MeZO on the top k encoder layers and the LM head only (0: every weight)"})
    zo_frozen_layer_cache: bool = field(default=True, metadata={
        "help": "on the engine: when every trained tensor is in layers >= L, cache the states entering L"})
    zo_frozen_cache_mb: float = field(default=2048.0, metadata={"help": "memory bound of that cache"})
    # Typed str for HfArgumentParser; in Python a callable ``(logits, labels) -> tensor`` is accepted too.
    zo_objective: Optional[str] = field(default=None, metadata={
        "help": "what MeZO minimises: 'cross_entropy' (default: the model's loss), 'negative_accuracy', or a "
                "callable (logits, labels) -> one value per example, averaged over the (global) batch"})
    max_grad_norm: float = field(default=0.0, metadata={"help": "unused by MeZO (no gradients)"})

    def __post_init__(self):
        super().__post_init__()
        if self.zo_trainable not in ("auto", "all", "lora", "head"):
            raise ValueError(f"zo_trainable must be 'auto', 'all', 'lora' or 'head', got {self.zo_trainable!r}")
        if self.zo_eps <= 0 or self.zo_num_samples < 1:
            raise ValueError("zo_eps must be > 0 and zo_num_samples >= 1")
        if self.zo_top_layers < 0 or self.zo_frozen_cache_mb <= 0:
            raise ValueError("zo_top_layers must be >= 0 and zo_frozen_cache_mb > 0")
        if not (self.zo_objective is None or callable(self.zo_objective) or self.zo_objective in OBJECTIVES):
            raise ValueError(f"zo_objective must be one of {sorted(OBJECTIVES)} or a callable (logits, labels) -> "
                             f"tensor, got {self.zo_objective!r}")

    @cached_property
    def _setup_devices(self) -> "torch.device":
        # A multi-process launch: the launcher's world must become torch.distributed's default
        # group (the Trainer's samplers, gathers and barriers use it), beside SGLang's world.
        launch = distributed.prepare_default_group()
        if launch is not None and not self.use_cpu and not torch.cuda.is_available():
            self.use_cpu = True  # accelerate builds a multi-process CPU world only when told it is on CPU
        return TrainingArguments._setup_devices.func(self)

    def to_dict(self):
        d = super().to_dict()
        d["zo_objective"] = _objective_name(self.zo_objective)  # a callable is not JSON
        return d


def _peft_saved_name(name: str) -> str:
    """PEFT's in-model name -> the name its save_pretrained writes (what z is keyed on)."""
    import re

    name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)  # an adapter's own head: its saved name
    return re.sub(r"\.lora_([AB])\.[^.]+\.weight$", r".lora_\1.weight", name)


def step_seed(base_seed: int, global_step: int, sample: int) -> int:
    """Seeds come from (args.seed, step, sample): a resumed run replays the same directions."""
    return zlib.crc32(f"{base_seed}:{global_step}:{sample}".encode())


class MeZOTrainer(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, MeZOTrainingArguments):
            raise TypeError("MeZOTrainer needs MeZOTrainingArguments")
        self._zo_target = None
        self.zo_history: List[Dict[str, float]] = []
        # MeZO averages its objective itself (sums and counts, one all-reduce across processes). The
        # Trainer's num_items_in_batch scaling is backprop's: it gathers a count every step and, with
        # several processes, multiplies compute_loss by their number for models that take the count
        # -- doubling evaluate()'s loss for one that ignores it (PromptClassifier). Models get none.
        self.model_accepts_loss_kwargs = False
        # Several processes: one all-reduce of the objective's sums per step (or a clear refusal).
        self.zo_data_parallel = distributed.reducer_for_trainer(self)

    # ---- no optimizer state: a placeholder SGD carries the LR schedule -------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self._zo_placeholder = torch.nn.Parameter(torch.zeros(1))
            self.optimizer = torch.optim.SGD([self._zo_placeholder], lr=self.args.learning_rate)
        return self.optimizer

    # ---- what is trained ---------------------------------------------------------------------
    def _base_model(self):
        m = self.model
        return m.model if isinstance(m, PromptClassifier) else m

    def zo_target(self):
        if self._zo_target is None:
            base = self._base_model()
            engine = hasattr(base, "runtime")
            mode = self.args.zo_trainable
            if mode == "auto":
                mode = "lora" if engine and base.active_adapters() else "all"
            if mode == "lora" and self.args.zo_top_layers:
                raise ValueError("zo_top_layers is for full-parameter MeZO; choose LoRA layers with "
                                 "LoraConfig(layers_to_transform=...)")
            include = None
            if self.args.zo_top_layers:
                first = base.config.num_hidden_layers - self.args.zo_top_layers
                if first < 0:
                    raise ValueError(f"zo_top_layers={self.args.zo_top_layers} is more than the model's "
                                     f"{base.config.num_hidden_layers} layers")
                include = lambda n: base_layer_of(n) >= first  # noqa: E731 (encoder layers >= first, LM head)
            if mode == "head":  # the head above the encoder (task head, pooler; the LM head's own tensors)
                if self.args.zo_top_layers:
                    raise ValueError("zo_trainable='head' trains the head only; zo_top_layers adds encoder layers: "
                                     "choose one")
                include, mode = (lambda n: base_layer_of(n) == HEAD), "all"  # noqa: E731
            if mode == "lora" and not engine:  # PEFT on transformers: the same PEFT names as the engine's
                self._zo_target = TorchParametersTarget(base, include=lambda n: "lora_" in n or "modules_to_save" in n,
                                                        rename=_peft_saved_name)
            elif mode == "lora":
                if not base.active_adapters():
                    raise ValueError("zo_trainable='lora' needs an active adapter (model.add_adapter / load_adapter)")
                self._zo_target = EngineAdapterTarget(base, base.active_adapters()[0])
            else:
                self._zo_target = EngineWeightsTarget(base, include) if engine else TorchParametersTarget(base, include)
            self._enable_frozen_layer_cache(base, engine)
        return self._zo_target

    def _enable_frozen_layer_cache(self, base, engine: bool) -> None:
        """Everything trained sits in layers >= L: the states entering L are fixed per example."""
        if not (engine and self.args.zo_frozen_layer_cache) or not self._zo_target.names:
            return
        layers = base.config.num_hidden_layers
        first = min(min_layer_of(self._zo_target.names), layers - 1)
        if first >= 1 and base.cache_stats()["frozen_layer"] is None:
            base.enable_frozen_layer_cache(first, self.args.zo_frozen_cache_mb)

    def _paired(self) -> bool:
        return (self.args.zo_paired_batch and isinstance(self.zo_target(), EngineAdapterTarget)
                and isinstance(self.model, PromptClassifier))

    def _ensure_scratch_adapters(self, target: EngineAdapterTarget):
        base = target.model
        config = base.adapter_info(target.adapter_name).peft_config
        for name in (PLUS, MINUS):
            if name not in base.peft_config:
                base._add_adapter(config, name, activate=False)  # reserved names; the user's stays active
        return base.adapter_info(PLUS).lora_id, base.adapter_info(MINUS).lora_id

    def _free_scratch_adapters(self) -> None:
        """Give back the two pool slots the paired passes borrowed, however train() ended: the
        user's adapters are then what they were (plus the trained weights)."""
        base = self._base_model()
        loaded = [n for n in (PLUS, MINUS) if n in base.peft_config] if hasattr(base, "runtime") else []
        if loaded:
            base.delete_adapter(loaded)

    def zo_num_parameters(self) -> int:
        """Elements of the tensors MeZO trains (engine weights, the adapter's A/B, or torch parameters)."""
        target = self.zo_target()
        if isinstance(target, EngineAdapterTarget):
            matrices = target.model.runtime.adapter_matrices(target.lora_id)
            shapes = [matrices[(layer, module)]["AB".index(which)].shape for layer, module, which in target.peft_names]
        elif isinstance(target, EngineWeightsTarget):
            slices = hf_parameter_slices(target.model.runtime.model)
            shapes = [slices[n].full_shape for n in target.names]
        else:
            shapes = [target.slices[n].full_shape for n in target.names]
        return sum(math.prod(shape) for shape in shapes)

    # ---- logs: MeZO's own numbers, not backprop's -----------------------------------------------
    def train(self, *args, **kwargs):
        trainer_logger = logging.getLogger(Trainer.__module__)
        count_filter = _TrainableCountFilter(self)
        trainer_logger.addFilter(count_filter)
        if self.zo_data_parallel is not None:
            distributed.keep_launcher_timeout(self.args.ddp_timeout)
        try:
            return super().train(*args, **kwargs)
        finally:
            trainer_logger.removeFilter(count_filter)
            self._free_scratch_adapters()

    def _get_grad_norm(self, model, grad_norm=None):
        return None  # no gradients: the step's projected gradient is logged instead (see log)

    def floating_point_ops(self, inputs) -> int:
        return 0  # Trainer's estimate (6 x tokens x parameters) is backprop's; MeZO counts no FLOPs

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        # A training-step log (it has "loss") gets the last step's projected gradient, as Trainer
        # logs the last step's grad_norm; no FLOP count is logged, since none is computed.
        if "loss" in logs and self.zo_history and self.zo_history[-1]["step"] == self.state.global_step - 1:
            grads = self.zo_history[-1]["projected_grads"]
            logs["zo_projected_grad"] = sum(grads) / len(grads)
        logs.pop("total_flos", None)
        super().log(logs, start_time)

    # ---- the step ----------------------------------------------------------------------------
    def _objective_sum(self, model, inputs) -> Tuple[float, int]:
        """``(sum, count)`` of the objective on this process's batch (mean = sum / count)."""
        with torch.no_grad():
            out = model(**inputs)
        labels = inputs.get("labels")
        objective = resolve_objective(self.args.zo_objective)
        if objective is MODEL_LOSS:
            loss = out["loss"] if isinstance(out, dict) else out.loss
            count = _items(labels, inputs["input_ids"].shape[0])
            if loss.dtype in (torch.float16, torch.bfloat16) and labels is not None:  # see float32_cross_entropy
                logits = out["logits"] if isinstance(out, dict) else out.logits
                loss = float32_cross_entropy(logits, labels)
            return float(loss) * count, count
        return objective_sum(objective, out["logits"] if isinstance(out, dict) else out.logits, labels)

    def _paired_sums(self, target: EngineAdapterTarget, inputs, seed: int) -> Tuple[float, float, int]:
        plus_id, minus_id = self._ensure_scratch_adapters(target)
        eps = self.args.zo_eps
        for lora_id, sign in ((plus_id, 1.0), (minus_id, -1.0)):
            target.model.runtime.collective_rpc(rank_copy_adapter, target.lora_id, lora_id)
            target.perturb(seed, sign * eps, lora_id=lora_id)
        ids, mask, labels = inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"]
        B = ids.shape[0]
        both = torch.cat([ids, ids]), (torch.cat([mask, mask]) if mask is not None else None)
        with torch.no_grad():
            logits = self.model.label_logits(*both, adapter_names=[PLUS] * B + [MINUS] * B)
        objective = resolve_objective(self.args.zo_objective)
        if objective is MODEL_LOSS:
            count = _items(labels, B)
            return (float(float32_cross_entropy(logits[:B], labels)) * count,
                    float(float32_cross_entropy(logits[B:], labels)) * count, count)
        (s_plus, count), (s_minus, _) = (objective_sum(objective, half, labels) for half in (logits[:B], logits[B:]))
        return s_plus, s_minus, count

    def training_step(self, model, inputs, num_items_in_batch=None):
        # A Ctrl-C during the step is raised when it ends: never leave the weights at theta +- eps z.
        with deferred_interrupts():
            return self._zo_step(model, inputs)

    def _zo_step(self, model, inputs):
        inputs = self._prepare_inputs(inputs)
        target = self.zo_target()
        args = self.args
        n, eps = args.zo_num_samples, args.zo_eps
        lr = self.lr_scheduler.get_last_lr()[0] if self.lr_scheduler is not None else args.learning_rate
        step = self.state.global_step
        paired = self._paired()
        sums_plus, sums_minus, seeds, count = [], [], [], 0
        for i in range(n):
            seed = step_seed(args.seed, step, i)
            if paired:
                s_plus, s_minus, count = self._paired_sums(target, inputs, seed)
            else:
                target.perturb(seed, eps)
                s_plus, count = self._objective_sum(model, inputs)
                target.perturb(seed, -2 * eps)
                s_minus, _ = self._objective_sum(model, inputs)
                if i < n - 1:
                    target.perturb(seed, eps)  # restore; the last sample restores inside its update
            sums_plus.append(s_plus if count else 0.0)  # nothing labelled here (NaN mean): add nothing
            sums_minus.append(s_minus if count else 0.0)
            seeds.append(seed)
        totals = sums_plus + sums_minus + [count]
        if self.zo_data_parallel is not None:  # ONE all-reduce: every process gets the global sums
            try:
                totals = self.zo_data_parallel.sum(totals, step)
            except BaseException:
                if not paired:
                    target.perturb(seeds[-1], eps)  # leave theta, not theta - eps z, behind
                raise
        count = totals[-1]
        means = [t / count if count else float("nan") for t in totals[:-1]]
        losses = means[:n]
        grads = [(p - m) / (2 * eps) if count else 0.0 for p, m in zip(means[:n], means[n:])]
        # The last sample's update goes first: it restores theta from theta - eps z in the same
        # pass over z, and applies weight decay to the restored theta (as Algorithm 1 does).
        restore = 0.0 if paired else eps
        for i in reversed(range(n)):
            last = i == n - 1
            target.update(seeds[i], lr, grads[i] / n, args.weight_decay if last else 0.0,
                          restore=restore if last else 0.0)
        self.zo_history.append({"step": step, "lr": lr, "projected_grads": grads, "losses": losses})
        return torch.tensor(sum(losses) / n, device=args.device)

    # ---- checkpoints -------------------------------------------------------------------------
    def _save(self, output_dir: Optional[str] = None, state_dict=None):
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        base = self._base_model()
        if isinstance(self.zo_target(), EngineAdapterTarget):
            base.save_adapter(output_dir, self.zo_target().adapter_name)
        else:
            base.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        args = self.args
        if callable(args.zo_objective):  # a lambda does not pickle: record its name
            args = copy.copy(args)
            args.zo_objective = _objective_name(self.args.zo_objective)
        torch.save(args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        self.zo_target().load_checkpoint(resume_from_checkpoint)
