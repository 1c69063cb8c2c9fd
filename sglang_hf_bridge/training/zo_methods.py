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
(Sparse MeZO). A method is pure torch (it imports only the z definition) and picklable: under tensor parallelism it
travels to every rank, so a user's class must be importable there (defined in a module).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from ..engine.directions import direction_seed, fill_direction

State = Dict[str, torch.Tensor]
logger = logging.getLogger(__name__)


class ZOMethod:
    """The protocol (and MeZO's ZO-SGD as its default behaviour). Subclass and override the hooks;
    ``name`` appears in logs and checkpoints."""

    name = "custom"
    # Measure the loss at the unperturbed weights too (one more forward pass per step; HiZOO).
    loss_at_theta = False
    # Bytes of state the method keeps per trained parameter (float32 entries: 4 each): what the
    # trainer announces before the first step and refuses above ``zo_method_state_limit_mb``.
    state_bytes_per_parameter = 0.0

    # State keys kept whole on every tensor-parallel rank (not shaped like the trained tensor:
    # LOZO-M's momentum in U-space); every other state tensor is this rank's share, like theta.
    whole_state: Tuple[str, ...] = ()
    # ZO-SGD-Cons: after estimating g, measure the loss at theta -+ lr * g * direction and keep the
    # best of theta and the two (two more forward passes; one direction per step).
    conservative = False

    def state_bytes(self, shapes: Dict[str, Tuple[int, ...]]) -> float:
        """Bytes of state for the trained tensors of these (HF) shapes: announced before step 1."""
        return self.state_bytes_per_parameter * sum(math.prod(s) for s in shapes.values())

    def begin_step(self, step: int, seed: int) -> None:
        """Once per step on the trainer's side, before anything else (``seed``: the run's base
        seed): what depends on the step number (LOZO's V, resampled every ``interval`` steps)."""

    def draw(self, out: torch.Tensor, seed: int, name: str) -> torch.Tensor:
        """The direction of one trained tensor, whole at its HF shape, written into ``out``
        (float32 scratch): by default N(0, 1) from (seed, name). Every rank draws it whole and
        takes its share, so a trajectory does not depend on tp_size."""
        return fill_direction(out, seed, name)

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

    def estimate(self, where, samples: Sequence[Tuple[int, float]], state: State,
                 z_of: Callable[[int], torch.Tensor], restore: Optional[Tuple[int, float]] = None) -> torch.Tensor:
        """The step's gradient estimate for this rank's share of one tensor: the sum of
        :meth:`gradient` over ``samples`` ((seed, g_i / n) pairs; ``z_of(seed)`` = this rank's share of
        :meth:`draw`). ``where`` is the share (``name``, HF ``shape``, ``full_shape``, ``index``,
        ``view``); ``restore`` = (seed, scale): first add scale * that direction to ``where.view`` (the
        end of the last perturbation, in the same pass over z)."""
        grad = None
        for seed, g in samples:
            z = z_of(seed)
            if restore is not None and seed == restore[0]:
                where.view.add_(self.direction(where.name, z, state), alpha=restore[1])
            part = self.gradient(where.name, z, g, state)
            grad = part if grad is None else grad.add_(part)
        return grad

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
            zeros = sorted(n for n, t in full_tensors.items() if not t.any())
            if zeros:  # LoRA's B starts at zero: h = 0, so after its first move B is never perturbed again
                logger.warning("zo_optimizer='sparse': %d trained tensor(s) are all zeros at the start (%s%s), so "
                               "their threshold is 0 and only their still-zero entries are trained (after step 1: "
                               "none). Sparse MeZO is a full-parameter rule; start from a trained adapter, or "
                               "use another method.", len(zeros), zeros[0], ", ..." if len(zeros) > 1 else "")

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


@dataclass
class ZOConservative(ZOMethod):
    """ZO-SGD-Cons (ZO-Bench's ``zo_conserv_step``): with l0 the loss at theta, l- at
    theta - lr g z and l+ at theta + lr g z (five forward passes per step), keep theta - lr g z if
    l- <= l0 and l- < l+, theta if l0 < l- and l0 < l+, else theta + lr g z -- their comparisons,
    ties included. Weight decay (ZO-Bench runs without) is decoupled: theta - lr wd theta, whichever
    point is kept."""

    name = "conservative"
    loss_at_theta = True
    conservative = True

    @staticmethod
    def choose(l_theta: float, l_step: float, l_opposite: float) -> float:
        """The kept point as a multiple s of the SGD step: theta - s * lr * g * z (1, 0 or -1)."""
        if l_step > l_theta:
            return 0.0 if l_theta < l_opposite else -1.0
        return 1.0 if l_step < l_opposite else -1.0


def _interval_seed(seed: int, interval_index: int) -> int:
    """LOZO's V seed: one per ``interval`` steps, a pure function of the run's seed (resume, DP)."""
    return direction_seed(seed, f"lozo-v/{interval_index}")


@dataclass
class ZOLowRank(ZOMethod):
    """LOZO (Chen et al., 2024): each matrix (2-D or more: [m, n...]) is perturbed and updated along
    U V^T, U [m, rank] N(0, 1) new every step, V [n, rank] N(0, 1) resampled every ``interval`` steps
    (no scaling, as the authors' code); 1-D tensors along a full z. theta -= lr (g U V^T + wd theta).
    U and V are drawn from their own seeds, so perturbation and update use the same U on every step
    (the authors' code draws V and U from one stream, which offsets U's update on resample steps).
    Nothing stored: V is redrawn from its seed. Defaults: the authors' RoBERTa scripts (rank 4, 50)."""

    rank: int = 4
    interval: int = 50
    name = "lozo"

    def __post_init__(self):
        if self.rank < 1 or self.interval < 1:
            raise ValueError(f"LOZO needs rank >= 1 and interval >= 1, got {self.rank}, {self.interval}")
        self.begin_step(0, 0)

    def begin_step(self, step, seed):
        self._step = step
        self._v_seed = _interval_seed(seed, step // self.interval)
        self._v_old_seed = _interval_seed(seed, step // self.interval - 1) if step >= self.interval else None

    def factors(self, seed: int, name: str, shape: Tuple[int, ...], v_seed: Optional[int] = None):
        """(U [m, rank], V [n, rank]) of one matrix at a step with this seed (V: this interval's)."""
        m, n = shape[0], math.prod(shape[1:])
        u = torch.randn(m, self.rank, generator=torch.Generator().manual_seed(direction_seed(seed, name)))
        v_gen = torch.Generator().manual_seed(direction_seed(self._v_seed if v_seed is None else v_seed, name))
        return u, torch.randn(n, self.rank, generator=v_gen)

    def draw(self, out, seed, name):
        if out.dim() < 2:
            return fill_direction(out, seed, name)
        u, v = self.factors(seed, name, tuple(out.shape))
        torch.mm(u, v.t(), out=out.view(u.shape[0], v.shape[0]))
        return out

    def describe(self):
        return {"name": self.name, "rank": self.rank, "interval": self.interval}


@dataclass
class ZOLowRankMomentum(ZOLowRank):
    """LOZO-M, as the authors' ``lowrank_zo_update_momentum``: momentum kept in U-space per matrix,
    M [m, rank] (first step M = g U, then M = beta M + (1 - beta) g U); when V is resampled, the
    previous M is carried over as M V_old^T V / n; theta -= lr (M V^T + wd theta). 1-D tensors: M =
    g z, then beta M + (1 - beta) g z. State: rank / n floats per matrix entry, one per 1-D entry.
    (The authors' code never projects with interval 1; here the projection is applied every time V
    changes.)"""

    beta1: float = 0.9
    name = "lozo-m"
    whole_state = ("momentum_u",)

    def state_bytes(self, shapes):
        return 4.0 * sum(s[0] * self.rank if len(s) >= 2 else math.prod(s) for s in shapes.values())

    def _blend(self, state, key, value, project=None):
        previous = state.get(key)
        if previous is None:
            state[key] = value
        else:
            carried = previous if project is None else project(previous)
            state[key] = carried.mul_(self.beta1).add_(value, alpha=1 - self.beta1)
        return state[key]

    def estimate(self, where, samples, state, z_of, restore=None):
        if restore is not None:
            where.view.add_(z_of(restore[0]), alpha=restore[1])
        if len(where.shape) < 2:  # this rank's share, like theta
            return self._blend(state, "momentum", sum(z_of(seed) * g for seed, g in samples))
        n = math.prod(where.shape[1:])
        pairs = [(self.factors(seed, where.name, where.shape), g) for seed, g in samples]
        v = pairs[0][0][1]
        gu = sum(u * g for (u, _), g in pairs)
        project = None
        if self._v_old_seed is not None and self._step % self.interval == 0:
            v_old = self.factors(0, where.name, where.shape, self._v_old_seed)[1]
            project = lambda m: m @ (v_old.t() @ v) / n  # noqa: E731
        m = self._blend(state, "momentum_u", gu, project)
        full = (m @ v.t()).view(where.full_shape)
        return full[where.index].to(where.view.dtype)

    def describe(self):
        return {**super().describe(), "beta1": self.beta1}


METHODS = {"sgd": ZOSGD, "sign": ZOSign, "momentum": ZOMomentum, "adam": ZOAdam, "sparse": ZOSparse,
           "hizoo": ZOHiZOO, "conservative": ZOConservative, "lozo": ZOLowRank, "lozo-m": ZOLowRankMomentum}


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
