"""Random directions z for zeroth-order training, and the in-place updates that use them.

z is defined per HF/PEFT tensor name: N(0, 1) at the full HF shape from a CPU generator seeded
by ``(seed, name)`` (:func:`fill_direction`, the one definition). MeZO never stores z; it regenerates it for every pass
over the weights, so generating it is a real share of a step's time on a CPU. Two things make
that cheap without changing a single value:

* names are independent (one generator each), so :func:`for_each_direction` splits them over
  a few threads (torch releases the GIL in ``normal_``), balanced by size;
* each thread draws into a scratch buffer it keeps between passes (as large as its largest
  tensor), instead of allocating and page-faulting a fresh tensor per name and pass.
"""

from __future__ import annotations

import threading
import zlib
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from math import prod
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch


@dataclass
class NamedSlice:
    name: str  # HF / PEFT name
    full_shape: Tuple[int, ...]
    view: torch.Tensor  # this rank's memory (engine weights, adapter slot or torch parameter)
    index: Tuple[slice, ...]  # where ``view`` sits inside the full tensor
    # The HF tensor's shape when ``full_shape`` views it otherwise (a fused checkpoint tensor seen
    # as [parts, rows, ...]: the same values in the same order, so z is the same either way).
    hf_shape: Optional[Tuple[int, ...]] = None

    @property
    def shape(self) -> Tuple[int, ...]:
        """The HF tensor's shape."""
        return self.hf_shape or self.full_shape


def direction_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def fill_direction(out: torch.Tensor, seed: int, name: str) -> torch.Tensor:
    """Write z of one HF-named tensor into ``out`` (float32, the full HF shape): N(0, 1) drawn from
    (seed, name) alone -- the same values as ``torch.randn(shape, generator=g)``."""
    return out.normal_(generator=torch.Generator().manual_seed(direction_seed(seed, name)))


# ---- parallel generation into reused scratch memory ---------------------------------------------
DIRECTION_THREADS = 2
_pool: Optional[ThreadPoolExecutor] = None
_scratch = threading.local()


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(DIRECTION_THREADS, thread_name_prefix="zo-directions")
    return _pool


def _draw(seed: int, s: NamedSlice, method=None) -> torch.Tensor:
    """z of one tensor at ``s.full_shape`` into this thread's scratch buffer (valid until the
    thread's next draw): N(0, 1), or what the method's ``draw`` writes at the HF shape (LOZO's U V^T)."""
    n = prod(s.full_shape)
    buf = getattr(_scratch, "buffer", None)
    if buf is None or buf.numel() < n:
        buf = _scratch.buffer = torch.empty(n, dtype=torch.float32)
    if method is None:
        return fill_direction(buf[:n].view(s.full_shape), seed, s.name)
    return method.draw(buf[:n].view(s.shape), seed, s.name).view(s.full_shape)


def release_scratch() -> None:
    """Stop the z threads and drop their scratch buffers (as large as the largest trained
    tensor); called when an engine closes. The next pass starts them again."""
    global _pool
    if _pool is not None:
        _pool.shutdown(wait=True)
        _pool = None
    _scratch.__dict__.clear()


def for_each_direction(slices: Dict[str, NamedSlice], names: Sequence[str], seed: int,
                       apply: Callable[[NamedSlice, torch.Tensor], None], method=None) -> None:
    """Call ``apply(slice, z[slice.index])`` for every name; names run on parallel threads.

    Whole or not at all: if anything fails (an exception, a Ctrl-C in the waiting thread) after
    some tensors were changed, the remaining ones are changed too before the error is raised
    (there is no exact way back); if nothing was changed yet, nothing is."""
    groups: List[List[str]] = [[] for _ in range(DIRECTION_THREADS)]
    load = [0] * DIRECTION_THREADS
    for name in sorted(names, key=lambda n: -prod(slices[n].full_shape)):
        k = load.index(min(load))
        groups[k].append(name)
        load[k] += prod(slices[name].full_shape)
    done: set = set()

    def work(group: List[str]) -> None:
        with torch.no_grad():
            for name in group:
                if name not in done:
                    s = slices[name]
                    apply(s, _draw(seed, s, method)[s.index].to(s.view.dtype))
                    done.add(name)

    groups = [g for g in groups if g]
    futures = []
    try:
        if len(groups) <= 1:
            for g in groups:
                work(g)
            return
        for g in groups:  # one by one: on a failure, ``futures`` holds every thread started
            futures.append(_executor().submit(work, g))
        for future in futures:
            future.result()
    except BaseException:
        wait(futures)
        if done:  # roll forward: finish what was started
            for g in groups:
                work(g)
        raise


# ---- the in-place MeZO operations -----------------------------------------------------------------
def add_scaled_directions(slices: Dict[str, NamedSlice], names: Sequence[str], seed: int, scale: float) -> None:
    """theta <- theta + scale * z (in place)."""
    for_each_direction(slices, names, seed, lambda s, z: s.view.add_(z, alpha=scale))


def zo_update(slices: Dict[str, NamedSlice], names: Sequence[str], seed: int, lr: float, projected_grad: float,
              weight_decay: float, no_decay: Sequence[str], restore: float = 0.0) -> None:
    """theta <- theta - lr * (g * z + wd * theta), z regenerated from the seed (MeZO's update).

    ``restore`` first adds ``restore * z`` (the end of the +eps/-eps perturbation) in the same
    pass, so a step regenerates z three times instead of four.
    """
    no_decay = set(no_decay)

    def apply(s: NamedSlice, z: torch.Tensor) -> None:
        if restore:
            s.view.add_(z, alpha=restore)
        if weight_decay and s.name not in no_decay:
            s.view.sub_(lr * (projected_grad * z + weight_decay * s.view))
        else:
            s.view.sub_(z, alpha=lr * projected_grad)

    for_each_direction(slices, names, seed, apply)


# ---- any zeroth-order method (training/zo_methods.py's protocol) ---------------------------------
# ``store``: name -> the method's state for that tensor, kept by whoever holds the tensors (a rank,
# the trainer for torch models and float32 master copies). MeZO's ZO-SGD keeps the fused path above.
def method_prepare(slices: Dict[str, NamedSlice], names: Sequence[str], method, store: Dict[str, dict]) -> None:
    """At the unperturbed weights, before a step's perturbations: state allocated on first use,
    then the method's per-step preparation (Sparse MeZO's mask)."""
    with torch.no_grad():
        for name in names:
            s = slices[name]
            state = store.get(name)
            if state is None:
                state = store[name] = method.init_state(name, s.view)
            method.prepare(name, s.view, state)


def method_perturb(slices: Dict[str, NamedSlice], names: Sequence[str], seed: int, scale: float, method,
                   store: Dict[str, dict]) -> None:
    """theta <- theta + scale * direction(z)."""
    for_each_direction(slices, names, seed,
                       lambda s, z: s.view.add_(method.direction(s.name, z, store[s.name]), alpha=scale), method)


def method_update(slices: Dict[str, NamedSlice], names: Sequence[str], samples: Sequence[Tuple[int, float]],
                  lr: float, weight_decay: float, no_decay: Sequence[str], method, store: Dict[str, dict],
                  restore: Optional[Tuple[int, float]] = None) -> None:
    """One update of every tensor from the step's directions: ``samples`` = (seed, g_i / n) pairs,
    grad = sum of the method's ``gradient`` (by default g_i / n * direction_i); ``restore`` =
    (seed, scale) first adds scale * that direction (the end of the last perturbation). Whole or not
    at all, as :func:`for_each_direction`."""
    no_decay = set(no_decay)

    def one(name: str) -> None:
        s, state = slices[name], store[name]

        def z_of(seed: int) -> torch.Tensor:
            return _draw(seed, s, method)[s.index].to(s.view.dtype)

        grad = method.estimate(s, samples, state, z_of, restore)
        method.update(name, s.view, grad, lr, 0.0 if name in no_decay else weight_decay, state)

    done: set = set()
    try:
        with torch.no_grad():
            for name in names:
                one(name)
                done.add(name)
    except BaseException:
        if done:  # roll forward, as for_each_direction: there is no exact way back
            with torch.no_grad():
                for name in names:
                    if name not in done:
                        one(name)
        raise
