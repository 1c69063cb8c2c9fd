"""``MeZOTrainingArguments``: HF ``TrainingArguments`` plus what zeroth-order training needs (the
trained tensors, eps, n-SPSA, the objective, the method and its hyper-parameters)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional

import torch
from transformers import TrainingArguments

from . import distributed
from .objectives import OBJECTIVES, _objective_name
from .zo_methods import ZOMethod, resolve_method


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
    # Typed str for HfArgumentParser; in Python a ZOMethod object (training/zo_methods.py) is accepted too.
    zo_optimizer: Optional[str] = field(default="sgd", metadata={
        "help": "the zeroth-order method: 'sgd' (MeZO), 'sign', 'momentum', 'conservative', 'adam', 'sparse', "
                "'hizoo', 'lozo', 'lozo-m', or a ZOMethod"})
    zo_momentum: float = field(default=0.9, metadata={"help": "zo_optimizer='momentum': its coefficient"})
    zo_adam_beta1: float = field(default=0.9, metadata={"help": "zo_optimizer='adam': beta1"})
    zo_adam_beta2: float = field(default=0.999, metadata={"help": "zo_optimizer='adam': beta2"})
    zo_adam_epsilon: float = field(default=1e-8, metadata={"help": "zo_optimizer='adam': epsilon"})
    zo_sparsity: float = field(default=0.8, metadata={
        "help": "zo_optimizer='sparse': the fraction of each tensor's entries left untouched (its largest)"})
    zo_hizoo_alpha: float = field(default=1e-8, metadata={
        "help": "zo_optimizer='hizoo': the Hessian smoothing coefficient (the authors' README example: 1e-8)"})
    zo_lozo_rank: int = field(default=4, metadata={"help": "zo_optimizer='lozo'/'lozo-m': rank of U V^T"})
    zo_lozo_interval: int = field(default=50, metadata={
        "help": "zo_optimizer='lozo'/'lozo-m': steps between draws of V (the authors' nu)"})
    zo_lozo_beta1: float = field(default=0.9, metadata={"help": "zo_optimizer='lozo-m': momentum coefficient"})
    zo_method_state_limit_mb: float = field(default=4096.0, metadata={
        "help": "the most memory a zo_optimizer's state may take (Adam: 2 x the trained parameters); above it "
                "training is refused before the first step"})
    max_grad_norm: float = field(default=0.0, metadata={"help": "unused by MeZO (no gradients)"})

    def __post_init__(self):
        super().__post_init__()
        if self.zo_trainable not in ("auto", "all", "lora", "head"):
            raise ValueError(f"zo_trainable must be 'auto', 'all', 'lora' or 'head', got {self.zo_trainable!r}")
        if self.zo_eps <= 0 or self.zo_num_samples < 1:
            raise ValueError("zo_eps must be > 0 and zo_num_samples >= 1")
        if self.zo_top_layers < 0 or self.zo_frozen_cache_mb <= 0:
            raise ValueError("zo_top_layers must be >= 0 and zo_frozen_cache_mb > 0")
        self.zo_method()  # a bad name or hyper-parameter is refused here, before training starts
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

    def zo_method(self) -> ZOMethod:
        """``zo_optimizer`` resolved (one object per arguments: it carries what setup derived)."""
        method = self.__dict__.get("_zo_method")
        if method is None:
            lozo = dict(rank=self.zo_lozo_rank, interval=self.zo_lozo_interval)
            hyper = {"momentum": dict(momentum=self.zo_momentum), "sparse": dict(sparsity=self.zo_sparsity),
                     "adam": dict(beta1=self.zo_adam_beta1, beta2=self.zo_adam_beta2, eps=self.zo_adam_epsilon),
                     "hizoo": dict(alpha=self.zo_hizoo_alpha), "lozo": lozo,
                     "lozo-m": dict(lozo, beta1=self.zo_lozo_beta1)}
            name = self.zo_optimizer
            method = resolve_method(name, **(hyper.get(name, {}) if isinstance(name, str) else {}))
            self.__dict__["_zo_method"] = method
        return method

    def to_dict(self):
        d = super().to_dict()
        d["zo_objective"] = _objective_name(self.zo_objective)  # a callable is not JSON
        d["zo_optimizer"] = self.zo_method().name
        d.pop("_zo_method", None)
        return d
