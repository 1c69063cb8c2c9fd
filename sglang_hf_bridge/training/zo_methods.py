"""Zeroth-order methods behind ``MeZOTrainingArguments(zo_optimizer=...)``: how to perturb, how to
update from the measured losses. A method is a small object (:class:`ZOMethod`); the trainer measures
the losses, and the method's per-tensor hooks run wherever the trained tensors live (the engine's
ranks, an adapter's pool slot, a torch model), each tensor with its own state.

The protocol, per trained tensor ``theta`` (a view of this rank's share of it):

* ``init_state(name, theta)`` -> the tensors the method keeps across steps (momentum, moments...),
  allocated at the first step, saved in checkpoints, restored on resume;
* ``prepare(name, theta, state)`` at the unperturbed weights, once per step before perturbing
  (Sparse MeZO's mask is derived there from the weights);
* ``direction(name, z, state)`` -> the direction perturbed and updated along, from the N(0, 1) z
  drawn per (seed, name) (the default: z itself);
* ``projected_gradient(g)`` -> the scalar the update uses, from the measured (l+ - l-) / 2 eps;
* ``update(name, theta, grad, lr, weight_decay, state)`` with ``grad`` = the step's gradient
  estimate, sum over directions of projected_gradient(g_i) * direction_i / n.

Built-in: ``"sgd"`` (MeZO's ZO-SGD, the default), ``"sign"``, ``"momentum"``, ``"adam"`` (ZO-Bench's
ZO-SGD-Sign, -MMT and ZO-Adam: torch's SGD / AdamW rules on the gradient estimate) and ``"sparse"``
(Sparse MeZO). A method is pure torch (no engine import) and picklable: under tensor parallelism it
travels to every rank, so a user's class must be importable there (defined in a module).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Union

import torch

State = Dict[str, torch.Tensor]


class ZOMethod:
    """The protocol (and MeZO's ZO-SGD as its default behaviour). Subclass and override the hooks;
    ``name`` appears in logs and checkpoints."""

    name = "custom"
    # Measure the loss at the unperturbed weights too (one more forward pass per step; HiZOO).
    loss_at_theta = False
    # Bytes of state the method keeps per trained parameter (float32 entries: 4 each): what the
    # trainer announces before the first step and refuses above ``zo_method_state_limit_mb``.
    state_bytes_per_parameter = 0.0

    def setup(self, full_tensors: Dict[str, torch.Tensor]) -> None:
        """Once, before the first step, with every trained tensor whole (on any tensor-parallel
        layout): what a method derives from the whole weights (Sparse MeZO's thresholds)."""

    def setup_state(self) -> Dict:
        """What :meth:`setup` derived, as JSON (written to checkpoints; a resume skips setup)."""
        return {}

    def load_setup_state(self, data: Dict) -> None:
        pass

    def init_state(self, name: str, theta: torch.Tensor) -> State:
        return {}

    def prepare(self, name: str, theta: torch.Tensor, state: State) -> None:
        pass

    def direction(self, name: str, z: torch.Tensor, state: State) -> torch.Tensor:
        return z

    def projected_gradient(self, g: float) -> float:
        return g

    def gradient(self, name: str, z: torch.Tensor, g: float, state: State) -> torch.Tensor:
        """One direction's share of the gradient estimate (``g`` is projected_gradient / n)."""
        return self.direction(name, z, state) * g

    def observe(self, l_plus: float, l_minus: float, l_theta: Optional[float], eps: float) -> None:
        """The step's measured losses (``l_theta`` at the unperturbed weights when
        ``loss_at_theta``), before the update: what a method derives from them travels with it."""

    def update(self, name: str, theta: torch.Tensor, grad: torch.Tensor, lr: float, weight_decay: float,
               state: State) -> None:
        if weight_decay:
            theta.sub_(lr * (grad + weight_decay * theta))
        else:
            theta.sub_(grad, alpha=lr)

    def describe(self) -> Dict[str, Union[str, float]]:
        """Name and hyper-parameters (logged, written to checkpoints)."""
        return {"name": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}


@dataclass
class ZOSGD(ZOMethod):
    """MeZO (Malladi et al., 2023, Algorithm 1): theta -= lr * (g z + wd theta)."""

    name = "sgd"


@dataclass
class ZOSign(ZOMethod):
    """ZO-SGD-Sign as ZO-Bench's code computes it: the sign of the projected gradient times z,
    theta -= lr * (sign(g) z + wd theta)."""

    name = "sign"

    def projected_gradient(self, g: float) -> float:
        return float(math.copysign(1.0, g)) if g else 0.0


@dataclass
class ZOMomentum(ZOMethod):
    """ZO-SGD-MMT: torch.optim.SGD(momentum=beta) on the gradient estimate ghat = g z (ZO-Bench):
    d = ghat + wd theta; buf = d on the first step, else beta buf + d; theta -= lr buf."""

    momentum: float = 0.9
    name = "momentum"
    state_bytes_per_parameter = 4.0

    def init_state(self, name, theta):
        return {"momentum_buffer": torch.zeros_like(theta), "step": torch.zeros((), dtype=torch.float64)}

    def update(self, name, theta, grad, lr, weight_decay, state):
        d = grad + weight_decay * theta if weight_decay else grad
        buf = state["momentum_buffer"]
        if state["step"].item() == 0:
            buf.copy_(d)
        else:
            buf.mul_(self.momentum).add_(d)
        state["step"] += 1
        theta.sub_(buf, alpha=lr)


@dataclass
class ZOAdam(ZOMethod):
    """ZO-Adam: torch.optim.AdamW's rule on the gradient estimate ghat = g z (decoupled weight decay,
    bias-corrected moments; ZO-Bench uses torch's Adam). Two moment tensors per trained tensor."""

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    name = "adam"
    state_bytes_per_parameter = 8.0

    def init_state(self, name, theta):
        return {"exp_avg": torch.zeros_like(theta), "exp_avg_sq": torch.zeros_like(theta),
                "step": torch.zeros((), dtype=torch.float64)}

    def update(self, name, theta, grad, lr, weight_decay, state):
        state["step"] += 1
        t = state["step"].item()
        if weight_decay:
            theta.mul_(1 - lr * weight_decay)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(grad, 1 - self.beta1)
        v.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        bias1, bias2 = 1 - self.beta1 ** t, 1 - self.beta2 ** t
        denom = (v.sqrt() / math.sqrt(bias2)).add_(self.eps)
        theta.addcdiv_(m, denom, value=-lr / bias1)


@dataclass
class ZOSparse(ZOMethod):
    """Sparse MeZO (Liu et al., 2024, Algorithm 1, the dynamic mask): per tensor a magnitude
    threshold h fixed at the start (the ``1 - sparsity`` quantile of |theta|: with sparsity 0.8 the
    smallest 20 % are trained); each step the mask m = |theta| <= h is derived from the current
    weights, and only those entries are perturbed (m z) and updated (weight decay too). The mask
    lives for one step (a bool per entry); thresholds are computed from the whole tensor (the
    trainer sets ``thresholds`` from full tensors, so every tensor-parallel rank uses the same h)."""

    sparsity: float = 0.8
    thresholds: Dict[str, float] = field(default_factory=dict)
    name = "sparse"
    state_bytes_per_parameter = 1.0  # the step's bool mask

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must lie in [0, 1), got {self.sparsity}")

    def threshold_of(self, full: torch.Tensor) -> float:
        """h for one whole tensor: the k-th smallest |theta|, k = ceil((1 - sparsity) * numel)."""
        flat = full.detach().float().abs().flatten()
        k = max(1, math.ceil((1.0 - self.sparsity) * flat.numel()))
        return float(flat.kthvalue(k).values)

    def setup(self, full_tensors):
        if not self.thresholds:
            self.thresholds = {n: self.threshold_of(t) for n, t in full_tensors.items()}

    def setup_state(self):
        return {"thresholds": dict(self.thresholds)}

    def load_setup_state(self, data):
        self.thresholds = dict(data.get("thresholds", {}))

    def prepare(self, name, theta, state):
        state["mask"] = theta.abs() <= self.thresholds[name]

    def direction(self, name, z, state):
        return z * state["mask"]

    def update(self, name, theta, grad, lr, weight_decay, state):
        mask = state["mask"]
        if weight_decay:
            theta.sub_(lr * (grad + weight_decay * theta * mask))
        else:
            theta.sub_(grad, alpha=lr)

    def describe(self):
        return {"name": self.name, "sparsity": self.sparsity}


@dataclass
class ZOHiZOO(ZOMethod):
    """HiZOO (Zhao et al., 2024), as its authors' code computes it: a diagonal Hessian estimate H
    per entry (ones at the start); perturb along z / sqrt(H); with l0 = the loss at theta,
    H <- (1 - alpha) H + alpha |l+ + l- - 2 l0| / (2 eps^2) * H z^2, then
    theta -= lr * (g z / sqrt(H_new) + wd theta). Three forward passes per step (the authors'
    code runs a fourth for logging only), one direction per step."""

    alpha: float = 1e-8
    name = "hizoo"
    loss_at_theta = True
    state_bytes_per_parameter = 4.0

    def init_state(self, name, theta):
        return {"hessian": torch.ones_like(theta)}

    def observe(self, l_plus, l_minus, l_theta, eps):
        self._curvature = abs(l_plus + l_minus - 2 * l_theta) / (2 * eps ** 2)

    def direction(self, name, z, state):
        return z / state["hessian"].sqrt()

    def gradient(self, name, z, g, state):
        h = state["hessian"]
        increment = h * z * z  # from the H the step perturbed with
        h.mul_(1 - self.alpha).add_(increment, alpha=self.alpha * self._curvature)
        return z / h.sqrt() * g

    def describe(self):
        return {"name": self.name, "alpha": self.alpha}


METHODS = {"sgd": ZOSGD, "sign": ZOSign, "momentum": ZOMomentum, "adam": ZOAdam, "sparse": ZOSparse,
           "hizoo": ZOHiZOO}


def resolve_method(method: Union[None, str, ZOMethod], **hyper) -> ZOMethod:
    """``zo_optimizer`` as a method object: a name (with its hyper-parameters) or an object."""
    if method is None:
        return ZOSGD()
    if isinstance(method, ZOMethod):
        return method
    if method not in METHODS:
        raise ValueError(f"zo_optimizer must be one of {sorted(METHODS)} or a ZOMethod, got {method!r}")
    cls = METHODS[method]
    fields = getattr(cls, "__dataclass_fields__", {})
    return cls(**{k: v for k, v in hyper.items() if k in fields and v is not None})


def is_plain_sgd(method: Optional[ZOMethod]) -> bool:
    """MeZO's own rule (the engine's fused perturb/update path, three passes over z per step)."""
    return method is None or type(method) is ZOSGD
