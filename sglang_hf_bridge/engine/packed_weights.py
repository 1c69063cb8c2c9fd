"""The "onednn-packed" GEMM path: oneDNN's linear on weights reordered once into its blocked layout.

Why: given a weight in PyTorch's plain layout, oneDNN's linear reorders it on every call
(bfloat16) or runs a slower plain-layout kernel (float32 at short inputs). On the 2-core AMD EPYC
this project runs on, a 27-row product with a roberta-base FFN weight ran at 858 instead of 652
GFLOP/s in bfloat16 and 469 instead of 259 in float32 (docs/kernels.md) -- the whole gap to
OpenVINO at batch 1.

Exactness: a packed copy is a snapshot; it is used only while its weight is unchanged:

* a rank operation that writes base weights (MeZO's perturbations and updates, loads, resumes:
  whatever declares a ``BaseWrite``, :mod:`.versions`) drops every copy (:meth:`PackedWeights.dropped`);
* each copy also remembers its weight's storage address and PyTorch's in-place version counter,
  so an in-place write through the parameter or a detached view is noticed too.

A weight seen for the first time since it changed runs on its plain layout; a later pass that
sees it unchanged packs it. So inference packs each weight once, and MeZO -- which writes
between every two passes -- never pays for a copy it would use once (a pack of all roberta-base
weights costs ~0.13 s in float32, more than a batch-16 pass gains from it). The plain and the
packed product must then give the same bits, or which one ran would show in the answers: the
engine checks that on the model's own shapes before it offers the path (:func:`packing_is_exact`;
measured bit-identical here at every row count but one -- a single row in float32, where oneDNN
takes a vector kernel -- so where a single row differs, single rows always run plain).

Memory: a packed copy per linear weight (and the tied masked-LM decoder) lives beside the
weights the engine must keep in PyTorch's layout (state dicts, LoRA, MeZO write those): the
linears' weight bytes once more. ``gemm="onednn"`` is the lean choice (docs/memory.md).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from .. import compat


@dataclass
class _Copy:
    weight: "weakref.ref[torch.Tensor]"
    stamp: Tuple[int, int, int]  # (generation, storage address, in-place version)
    first_pass: int  # the pass that first saw this version
    packed: Optional[torch.Tensor] = None


class PackedWeights:
    """One rank's packed copies, keyed by weight; ``linear`` / ``linear_gelu`` compute through them."""

    def __init__(self, single_rows_plain: bool = False) -> None:
        self.single_rows_plain = single_rows_plain  # one-row products always from the plain weight
        self._copies: Dict[int, _Copy] = {}
        self._generation = 0
        self._pass = 0
        self.packs = 0  # how many copies were made (tests and benchmarks read it)

    # ------------------------------------------------------------------ what the rank tells it
    def next_pass(self) -> None:
        self._pass += 1

    def dropped(self) -> None:
        """Base weights were written: no copy is valid any more (freed now, not at the next pass)."""
        self._generation += 1
        self._copies.clear()

    @property
    def nbytes(self) -> int:
        return sum(c.packed.element_size() * c.packed.numel() for c in self._copies.values() if c.packed is not None)

    # ------------------------------------------------------------------ the products
    def weight_for(self, weight: torch.Tensor, rows: int) -> torch.Tensor:
        """The packed copy of ``weight`` when one is valid (made now if this version of the weight
        was already seen by an earlier pass), else ``weight`` itself."""
        if (rows == 1 and self.single_rows_plain) or weight.is_inference():
            return weight  # (an inference tensor has no version counter to follow)
        key = id(weight)
        stamp = (self._generation, weight.data_ptr(), compat.tensor_version(weight))
        copy = self._copies.get(key)
        if copy is None or copy.weight() is not weight or copy.stamp != stamp:
            self._copies[key] = _Copy(weakref.ref(weight, lambda _, k=key: self._copies.pop(k, None)), stamp,
                                      self._pass)
            return weight
        if copy.packed is None:
            if copy.first_pass == self._pass:
                return weight
            copy.packed = compat.onednn_pack_weight(weight)
            self.packs += 1
        return copy.packed

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._product(x, weight, bias, "none")

    def linear_gelu(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._product(x, weight, bias, "gelu")

    def _product(self, x, weight, bias, activation: str) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = compat.onednn_linear(flat, self.weight_for(weight, flat.shape[0]), bias, activation)
        return out.view(*x.shape[:-1], out.shape[-1])


# Row counts the exactness check compares at: around the kernels' blocking thresholds and the
# token counts engine batches have (one row is checked on its own).
CHECKED_ROWS = (2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 512, 513)


def packing_is_exact(dtype: torch.dtype, shapes: Sequence[Tuple[int, int]],
                     rows: Sequence[int] = CHECKED_ROWS) -> bool:
    """Whether oneDNN's linear gives the same bits from the packed and the plain weight for every
    ``(out, in)`` shape at every row count in ``rows``, with and without the fused GELU."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, k in shapes:
            w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype)
            b = torch.randn(n, generator=gen).to(dtype)
            packed = compat.onednn_pack_weight(w)
            for m in rows:
                x = torch.randn(m, k, generator=gen).to(dtype)
                for activation in ("none", "gelu"):
                    if not torch.equal(compat.onednn_linear(x, w, b, activation),
                                       compat.onednn_linear(x, packed, b, activation)):
                        return False
    return True
