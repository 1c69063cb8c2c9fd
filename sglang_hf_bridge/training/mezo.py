"""MeZOTrainer: zeroth-order SGD (Malladi et al., 2023, Algorithm 1) as a drop-in HF Trainer.

Per step and per sample i: seed s; theta += eps z; l+ ; theta -= 2 eps z; l- ; theta += eps z
(restore); g = (l+ - l-) / (2 eps); then theta -= lr (g z / n + wd theta) with z regenerated
from s. The last restore and its update share one pass over z (three z passes per step, not
four). No gradient buffers, no optimizer state, no second copy of the weights. For a LoRA
adapter on the engine the +eps z and -eps z passes run as two scratch adapters in ONE engine
batch (rows tagged per adapter).
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from transformers import Trainer, TrainingArguments

from ..engine import base_layer_of, min_layer_of, rank_copy_adapter
from .prompts import PromptClassifier
from .zo import EngineAdapterTarget, EngineWeightsTarget, TorchParametersTarget

PLUS, MINUS = "__zo_plus__", "__zo_minus__"


@dataclass
class MeZOTrainingArguments(TrainingArguments):
    zo_eps: float = field(default=1e-3, metadata={"help": "perturbation scale epsilon"})
    zo_num_samples: int = field(default=1, metadata={"help": "n of n-SPSA: directions per step"})
    zo_trainable: str = field(default="auto",
                              metadata={"help": "'all' weights, 'lora' (the active adapter), or 'auto'"})
    zo_paired_batch: bool = field(default=True, metadata={"help": "LoRA on the engine: +/- passes in one batch"})
    zo_top_layers: int = field(default=0, metadata={
        "help": "full-parameter MeZO on the top k encoder layers and the LM head only (0: every weight)"})
    zo_frozen_layer_cache: bool = field(default=True, metadata={
        "help": "on the engine: when every trained tensor is in layers >= L, cache the states entering L"})
    zo_frozen_cache_mb: float = field(default=2048.0, metadata={"help": "memory bound of that cache"})
    max_grad_norm: float = field(default=0.0, metadata={"help": "unused by MeZO (no gradients)"})

    def __post_init__(self):
        super().__post_init__()
        if self.zo_trainable not in ("auto", "all", "lora"):
            raise ValueError(f"zo_trainable must be 'auto', 'all' or 'lora', got {self.zo_trainable!r}")
        if self.zo_eps <= 0 or self.zo_num_samples < 1:
            raise ValueError("zo_eps must be > 0 and zo_num_samples >= 1")
        if self.zo_top_layers < 0 or self.zo_frozen_cache_mb <= 0:
            raise ValueError("zo_top_layers must be >= 0 and zo_frozen_cache_mb > 0")


def _peft_saved_name(name: str) -> str:
    """PEFT's in-model name -> the name its save_pretrained writes (what z is keyed on)."""
    import re

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
            if mode == "lora" and not engine:  # PEFT on transformers: the same PEFT names as the engine's
                self._zo_target = TorchParametersTarget(base, include=lambda n: "lora_" in n, rename=_peft_saved_name)
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
        if PLUS not in base.peft_config:
            import copy

            config = copy.deepcopy(base.adapter_info(target.adapter_name).peft_config)
            active = base.active_adapters()
            for name in (PLUS, MINUS):
                base.add_adapter(config, adapter_name=name)
            base.set_adapter(active[0])
        return base.adapter_info(PLUS).lora_id, base.adapter_info(MINUS).lora_id

    # ---- the step ----------------------------------------------------------------------------
    def _loss(self, model, inputs) -> float:
        with torch.no_grad():
            out = model(**inputs)
        loss = out["loss"] if isinstance(out, dict) else out.loss
        return float(loss)

    def _paired_losses(self, target: EngineAdapterTarget, inputs, seed: int):
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
        ce = torch.nn.functional.cross_entropy
        return float(ce(logits[:B], labels)), float(ce(logits[B:], labels))

    def training_step(self, model, inputs, num_items_in_batch=None):
        inputs = self._prepare_inputs(inputs)
        target = self.zo_target()
        args = self.args
        n, eps = args.zo_num_samples, args.zo_eps
        lr = self.lr_scheduler.get_last_lr()[0] if self.lr_scheduler is not None else args.learning_rate
        step = self.state.global_step
        grads, losses, seeds = [], [], []
        for i in range(n):
            seed = step_seed(args.seed, step, i)
            if self._paired():
                l_plus, l_minus = self._paired_losses(target, inputs, seed)
            else:
                target.perturb(seed, eps)
                l_plus = self._loss(model, inputs)
                target.perturb(seed, -2 * eps)
                l_minus = self._loss(model, inputs)
                if i < n - 1:
                    target.perturb(seed, eps)  # restore; the last sample restores inside its update
            grads.append((l_plus - l_minus) / (2 * eps))
            losses.append(l_plus)
            seeds.append(seed)
        # The last sample's update goes first: it restores theta from theta - eps z in the same
        # pass over z, and applies weight decay to the restored theta (as Algorithm 1 does).
        restore = 0.0 if self._paired() else eps
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
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        self.zo_target().load_checkpoint(resume_from_checkpoint)
