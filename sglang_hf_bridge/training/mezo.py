"""MeZOTrainer: zeroth-order SGD (Malladi et al., 2023, Algorithm 1) as a drop-in HF Trainer.

Per step and per sample i: seed s; theta += eps z; l+ ; theta -= 2 eps z; l- ; theta += eps z
(restore); g = (l+ - l-) / (2 eps); then theta -= lr (g z / n + wd theta) with z regenerated
from s. The last restore and its update share one pass over z (three z passes per step, not
four). No gradient buffers, no optimizer state, no second copy of the weights. For a LoRA
adapter on the engine the +eps z and -eps z passes run as two scratch adapters in ONE engine
batch (rows tagged per adapter).

Other zeroth-order methods (``zo_optimizer``: training/zo_methods.py) run through the same
measurements: their perturbations and updates are the method's hooks, HiZOO and ZO-SGD-Cons add the
loss at theta, ZO-SGD-Cons two more at the candidate points (:meth:`MeZOTrainer._conservative_update`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import zlib
from typing import Dict, List, Optional, Tuple

import torch
from transformers import Trainer

from ..engine import HEAD, base_layer_of, hf_parameter_slices, min_layer_of, rank_copy_adapter
from ..process import deferred_interrupts
from . import distributed
from .arguments import MeZOTrainingArguments
from .objectives import (  # noqa: F401 (re-exported)
    MODEL_LOSS,
    _items,
    _objective_name,
    negative_accuracy,
    objective_sum,
    resolve_objective,
)
from .prompts import PromptClassifier, float32_cross_entropy
from .zo import EngineAdapterTarget, EngineWeightsTarget, TorchParametersTarget
from .zo_methods import is_plain_sgd

logger = logging.getLogger(__name__)
PLUS, MINUS = "__zo_plus__", "__zo_minus__"
# A zeroth-order method's state in a checkpoint (training/zo_methods.py).
METHOD_STATE_FILE, METHOD_CONFIG_FILE, METHOD_KEY_SEP = "zo_method_state.safetensors", "zo_method.json", "::"
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
        self._zo_method_ready = False  # the method's setup (from the whole weights) runs before step 1
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
            head = target.model.runtime.adapter(target.lora_id).head  # the adapter's own head, if any
            shapes = [head[key[1]].shape if key[0] == "head" else matrices[key[:2]]["AB".index(key[2])].shape
                      for key in target.peft_names]
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

    def _paired_sums(self, target: EngineAdapterTarget, inputs, seed: int, method=None,
                     scale: Optional[float] = None) -> Tuple[float, float, int]:
        """The losses at theta +- scale * direction (default scale: eps) in one pass over a batch
        twice as long, through two scratch adapters: the trained one is never touched."""
        plus_id, minus_id = self._ensure_scratch_adapters(target)
        scale = self.args.zo_eps if scale is None else scale
        for lora_id, sign in ((plus_id, 1.0), (minus_id, -1.0)):
            target.model.runtime.collective_rpc(rank_copy_adapter, target.lora_id, lora_id)
            target.perturb(seed, sign * scale, lora_id=lora_id, **({"method": method} if method is not None else {}))
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

    def _sums_around(self, target, model, inputs, seed: int, scale: float, method, restore: bool
                     ) -> Tuple[float, float, int]:
        """Loss sums at theta + scale * d and theta - scale * d. Without the paired batch the
        weights are left at theta - scale * d unless ``restore``."""
        with_method = {"method": method} if method is not None else {}
        if self._paired():
            return self._paired_sums(target, inputs, seed, method, scale)
        target.perturb(seed, scale, **with_method)
        s_plus, count = self._objective_sum(model, inputs)
        target.perturb(seed, -2 * scale, **with_method)
        s_minus, _ = self._objective_sum(model, inputs)
        if restore:
            target.perturb(seed, scale, **with_method)
        return s_plus, s_minus, count

    def _global(self, totals: List[float], step: int, on_failure=None) -> List[float]:
        """Sums over every data-parallel process (one all-reduce), or these."""
        if self.zo_data_parallel is None:
            return totals
        try:
            return self.zo_data_parallel.sum(totals, step)
        except BaseException:
            if on_failure is not None:
                on_failure()
            raise

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
        method = None if is_plain_sgd(args.zo_method()) else args.zo_method()  # None: MeZO's fused path
        with_method = {"method": method} if method is not None else {}
        at_theta = method is not None and method.loss_at_theta
        conservative = method is not None and method.conservative
        if (at_theta or conservative) and n > 1:
            raise ValueError(f"zo_optimizer={method.name!r} takes one direction per step (zo_num_samples=1)")
        if method is not None:
            method.begin_step(step, args.seed)
            if not self._zo_method_ready:  # a new run (a resume restored both instead)
                full = target.full_tensors()
                self._check_method_memory(method, full)
                method.setup(full)
                del full
                target.set_method_state({}, method)  # not an earlier trainer's moments on the same model
                self._zo_method_ready = True
            target.prepare(method)
        theta_sum = self._objective_sum(model, inputs)[0] if at_theta else 0.0  # the loss at theta (HiZOO)
        sums_plus, sums_minus, seeds, count = [], [], [], 0
        for i in range(n):
            seed = step_seed(args.seed, step, i)
            # The last sample's restore is fused into its update (one pass over z fewer).
            s_plus, s_minus, count = self._sums_around(target, model, inputs, seed, eps, method,
                                                       restore=i < n - 1 or conservative)
            sums_plus.append(s_plus if count else 0.0)  # nothing labelled here (NaN mean): add nothing
            sums_minus.append(s_minus if count else 0.0)
            seeds.append(seed)
        totals = sums_plus + sums_minus + ([theta_sum] if at_theta else []) + [count]
        left_at_minus = not paired and not conservative  # the weights are at theta - eps z now
        totals = self._global(totals, step, on_failure=(
            (lambda: target.perturb(seeds[-1], eps, **with_method)) if left_at_minus else None))
        count = totals[-1]
        means = [t / count if count else float("nan") for t in totals[:-1]]
        losses = means[:n]
        grads = [(p - m) / (2 * eps) if count else 0.0 for p, m in zip(means[:n], means[n:2 * n])]
        record = {"step": step, "lr": lr, "projected_grads": grads, "losses": losses}
        if at_theta:
            record["loss_at_theta"] = means[2 * n]
        restore = (seeds[-1], eps) if left_at_minus else None
        if conservative:
            record["kept"] = self._conservative_update(target, model, inputs, method, seeds[0], grads[0],
                                                       means[2], lr, step)
        elif method is not None:  # one update from every direction, by the method's rule
            method.observe(means[n - 1], means[2 * n - 1], means[2 * n] if at_theta else None, eps)
            samples = [(seeds[i], method.projected_gradient(grads[i]) / n) for i in range(n)]
            target.method_update(samples, lr, args.weight_decay, method, restore=restore)
        # MeZO's fused path: the last sample's update goes first: it restores theta from theta - eps z
        # in the same pass over z, and applies weight decay to the restored theta (as Algorithm 1).
        for i in reversed(range(n) if method is None else ()):
            last = i == n - 1
            target.update(seeds[i], lr, grads[i] / n, args.weight_decay if last else 0.0,
                          restore=eps if last and left_at_minus else 0.0)
        self.zo_history.append(record)
        return torch.tensor(sum(losses) / n, device=args.device)

    def _conservative_update(self, target, model, inputs, method, seed: int, g: float, l_theta: float, lr: float,
                             step: int) -> float:
        """ZO-SGD-Cons: the losses at theta -+ lr * g * d (two forward passes, one all-reduce), then
        the kept point committed as an update theta - lr (s g d + wd theta), s in {1, 0, -1}."""
        pg = method.projected_gradient(g)
        kept = 0.0
        if lr * pg:  # (no move: every candidate is theta)
            sums = self._sums_around(target, model, inputs, seed, lr * pg, method, restore=True)
            s_opposite, s_step, count = self._global(list(sums), step)
            kept = method.choose(l_theta, s_step / count, s_opposite / count) if count else 0.0
        if kept or self.args.weight_decay:
            target.method_update([(seed, kept * pg)], lr, self.args.weight_decay, method)
        return kept

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
        self._save_method_state(output_dir)

    def _check_method_memory(self, method, full: Dict[str, torch.Tensor]) -> None:
        """Say what the method's state will take, and refuse it above the user's limit."""
        mib = method.state_bytes({n: tuple(t.shape) for n, t in full.items()}) / 2**20
        if mib > self.args.zo_method_state_limit_mb:
            raise MemoryError(
                f"zo_optimizer={method.name!r} keeps {mib:,.0f} MiB of state for the {self.zo_num_parameters():,} "
                "parameters trained here, above "
                f"zo_method_state_limit_mb={self.args.zo_method_state_limit_mb:g}. Raise the limit, train fewer "
                "tensors (LoRA, zo_top_layers), or use a stateless method ('sgd', 'sign')")
        if mib:
            logger.info("zo_optimizer=%r: %.0f MiB of method state for %s trained parameters", method.name, mib,
                        f"{self.zo_num_parameters():,}")

    def _save_method_state(self, output_dir: str) -> None:
        """A method other than MeZO's SGD: its hyper-parameters and setup (JSON) and its per-tensor
        state (safetensors, whole tensors) beside the weights, so a resume continues its trajectory."""
        method = self.args.zo_method()
        if is_plain_sgd(method) or not self._zo_method_ready:
            return
        from safetensors.torch import save_file

        state = self.zo_target().method_state(method)
        flat = {f"{name}{METHOD_KEY_SEP}{key}": t.contiguous() for name, keys in state.items()
                for key, t in keys.items() if key != "mask"}  # a step's mask is derived again
        save_file(flat, os.path.join(output_dir, METHOD_STATE_FILE))
        with open(os.path.join(output_dir, METHOD_CONFIG_FILE), "w") as f:
            json.dump({"method": method.describe(), "setup": method.setup_state()}, f, indent=1, default=str)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        self.zo_target().load_checkpoint(resume_from_checkpoint)
        config_file = os.path.join(resume_from_checkpoint, METHOD_CONFIG_FILE)
        method = self.args.zo_method()
        if is_plain_sgd(method) or not os.path.isfile(config_file):
            return
        from safetensors.torch import load_file

        with open(config_file) as f:
            saved = json.load(f)
        if saved["method"].get("name") != method.name:
            raise ValueError(f"{resume_from_checkpoint!r} was trained with "
                             f"zo_optimizer={saved['method'].get('name')!r}, not {method.name!r}")
        method.load_setup_state(saved.get("setup", {}))
        state: Dict[str, Dict[str, torch.Tensor]] = {}
        for flat, tensor in load_file(os.path.join(resume_from_checkpoint, METHOD_STATE_FILE)).items():
            name, key = flat.split(METHOD_KEY_SEP)
            state.setdefault(name, {})[key] = tensor
        self.zo_target().set_method_state(state, method)
        self._zo_method_ready = True
