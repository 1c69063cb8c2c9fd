"""Parameter layouts: where each engine parameter's real entries sit on every tensor-parallel rank
and in the full HF-shaped tensor. The one place that knows split dimensions, fused q/k/v parts and
SGLang's padding; the loader, ``save_pretrained``, MeZO's HF-named views, TP gathers, LoRA
placement and LM-head unpadding all ask a :class:`ParameterLayout` instead of re-deriving it.

What is split how is declared in :data:`~.weight_map.SPLITS`; the per-rank extents are read from
the engine's own parameter shapes when the engine starts (:func:`build_layouts`), and checked
against the padding rules below, so a change in SGLang's padding fails loudly at start instead of
shifting weights. Pure torch (no SGLang import): unit-tested alone at any tp size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

from ..errors import SGLangLayoutError
from .weight_map import ALL_PARTS, LORA_TARGETS, SPLITS, Split

# SGLang 0.5.23 pads the vocabulary to a multiple of 64 (``DEFAULT_VOCAB_PADDING_SIZE``) and gives
# each rank an equal block of the padded rows (``VocabParallelEmbedding``).
VOCAB_PADDING = 64
# On CPU it rounds ``intermediate_size`` up to a multiple of 32 * tp_size
# (``adjust_config_with_unaligned_cpu_tp``, the real size kept as ``original_intermediate_size``);
# the FFN is zero-padded to it, which keeps every result exact (GELU(0) = 0, zero columns).
CPU_FFN_ALIGNMENT = 32


def padded_vocab_size(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_PADDING) * VOCAB_PADDING


def padded_intermediate_size(intermediate_size: int, tp_size: int, device: str) -> int:
    if device != "cpu":
        return intermediate_size
    step = CPU_FFN_ALIGNMENT * tp_size
    return -(-intermediate_size // step) * step


def real_intermediate_size(config) -> int:
    """The checkpoint's FFN size (the engine's config holds the padded one)."""
    return int(getattr(config, "original_intermediate_size", None) or config.intermediate_size)


def module_dims(config, module: str) -> Tuple[int, int]:
    """(in, out) features of a LoRA target (``q_proj``…; a fused one -- ModernBERT's ``qkv_proj``,
    ``gate_up_proj`` -- covers every part) at the checkpoint's (unpadded) sizes."""
    weight = [config.hidden_size, config.hidden_size]  # [out, in], as the weight is stored
    target = LORA_TARGETS[module]
    split = _split_of(f"{target.base}.weight")
    if split is not None and split.sized_by == "intermediate":
        weight[split.dim] = real_intermediate_size(config)
    if target.fused:
        weight[0] *= len(split.parts)
    return weight[1], weight[0]


def tp_size_problems(config, tp_size: int, device: str) -> Sequence[str]:
    """What ``tp_size`` cannot split (heads are never padded: that would change the attention)."""
    problems = []
    if config.num_attention_heads % tp_size:
        problems.append(f"num_attention_heads={config.num_attention_heads}")
    if padded_intermediate_size(config.intermediate_size, tp_size, device) % tp_size:
        problems.append(f"intermediate_size={config.intermediate_size}")
    if padded_vocab_size(config.vocab_size) % tp_size:
        problems.append(f"padded vocabulary {padded_vocab_size(config.vocab_size)}")
    return problems


@dataclass(frozen=True)
class ParameterLayout:
    """One engine parameter (or LoRA matrix) over ``tp_size`` ranks.

    Along ``split_dim`` each rank holds ``per_rank`` entries of every fused part (``parts``: q, k,
    v stacked on each rank), padding included; rank ``r``'s block starts at ``r * per_rank`` of
    the padded whole, and only the first ``real_size`` entries of the whole are weights.
    ``split_dim`` None: replicated, every rank holds all of it. ``loader_pads``: the engine's
    tensor is padded but SGLang's loader expects it padded already (the CPU FFN); the vocabulary's
    loader pads by itself.
    """

    name: str
    tp_size: int = 1
    split_dim: Optional[int] = None
    per_rank: int = 0
    real_size: int = 0
    parts: Tuple[Optional[str], ...] = (None,)
    loader_pads: bool = False

    @property
    def replicated(self) -> bool:
        return self.split_dim is None

    def real_count(self, rank: int) -> int:
        """How many of rank ``rank``'s ``per_rank`` entries (per part) are real."""
        if self.replicated:
            raise ValueError(f"{self.name} is replicated, not split")
        return max(0, min(self.per_rank, self.real_size - rank * self.per_rank))

    def local(self, data: torch.Tensor, rank: int, part: Optional[str] = None,
              dim: Optional[int] = None) -> torch.Tensor:
        """A view of the real entries of one part in rank ``rank``'s tensor ``data``. ``dim``: where
        ``data`` carries the split axis when not at ``split_dim`` (the vocabulary in logits).
        ``part=ALL_PARTS``: every part at once, as ``[parts, real entries, ...]`` (a strided view:
        each part's padding left out)."""
        if part == ALL_PARTS:
            stacked = data.unflatten(0, (len(self.parts), -1))
            return stacked if self.replicated else stacked.narrow(1, 0, self.real_count(rank))
        if part is not None:
            width = data.shape[0] // len(self.parts)
            data = data.narrow(0, self.parts.index(part) * width, width)
        if self.replicated:
            return data
        return data.narrow(self.split_dim if dim is None else dim, 0, self.real_count(rank))

    def index(self, rank: int, ndim: int, part: Optional[str] = None) -> Tuple[slice, ...]:
        """Where :meth:`local` sits in the full (one-part, unpadded) HF tensor; for ``ALL_PARTS``
        in the fused tensor seen as ``[parts, real size, ...]`` (:meth:`full_shape`)."""
        if part == ALL_PARTS:
            return (slice(None),) + self.index(rank, ndim - 1)
        if self.replicated:
            return (slice(None),) * ndim
        start = rank * self.per_rank
        return (slice(None),) * self.split_dim + (slice(start, start + self.real_count(rank)),)

    def full_shape(self, local_shape: Sequence[int], part: Optional[str] = None) -> Tuple[int, ...]:
        """The HF shape of one part, from one rank's (fused, padded) shape; for ``ALL_PARTS`` the
        fused HF tensor as ``[parts, real size, ...]`` (its rows in order: the same memory)."""
        if part == ALL_PARTS:
            return (len(self.parts),) + self.full_shape(local_shape)
        shape = list(local_shape)
        if len(self.parts) > 1:
            shape[0] //= len(self.parts)
        if not self.replicated:
            shape[self.split_dim] = self.real_size
        return tuple(shape)

    def engine_full_shape(self, local_shape: Sequence[int]) -> Tuple[int, ...]:
        """The padded, fused shape of the whole over all ranks (what SGLang's LoRA hooks report)."""
        shape = list(local_shape)
        if not self.replicated:
            shape[self.split_dim] *= self.tp_size
        return tuple(shape)

    def gather(self, shards: Sequence[torch.Tensor], dim: Optional[int] = None) -> torch.Tensor:
        """Every rank's tensor (rank order) -> the full tensor, padding removed, fused parts
        stacked along dim 0 ([q; k; v] for the fused projection). ``dim`` as in :meth:`local`."""
        if self.replicated:
            return shards[0]
        dim = self.split_dim if dim is None else dim
        parts = [torch.cat([self.local(s, r, p, dim) for r, s in enumerate(shards)], dim=dim) for p in self.parts]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def part_of(self, full: torch.Tensor, part: Optional[str]) -> torch.Tensor:
        """One part of a :meth:`gather` ed tensor (``full`` itself for unfused parameters and for
        ``ALL_PARTS``: the gathered parts are stacked as the fused checkpoint tensor stacks them)."""
        if part is None or part == ALL_PARTS:
            return full
        width = full.shape[0] // len(self.parts)
        return full.narrow(0, self.parts.index(part) * width, width)

    def padded_for_loading(self, tensor: torch.Tensor) -> torch.Tensor:
        """An HF tensor zero-padded to the size SGLang's loader splits (itself if none is needed);
        one holding every fused part (a fused LoRA B) is padded part by part."""
        if not self.loader_pads:
            return tensor
        n = len(self.parts)
        if n > 1 and self.split_dim == 0 and tensor.shape[0] == n * self.real_size:
            return torch.cat([self._padded_part(t) for t in tensor.chunk(n, dim=0)])
        return self._padded_part(tensor)

    def _padded_part(self, tensor: torch.Tensor) -> torch.Tensor:
        missing = self.per_rank * self.tp_size - tensor.shape[self.split_dim]
        if missing <= 0:
            return tensor
        shape = list(tensor.shape)
        shape[self.split_dim] = missing
        return torch.cat([tensor, tensor.new_zeros(shape)], dim=self.split_dim)

    def lora(self, which: str, part: Optional[str] = None) -> "ParameterLayout":
        """The layout of LoRA's ``A`` [r, in] or ``B`` [out, r] on a layer with this weight: a
        column-parallel layer splits B's rows, a row-parallel one A's columns (as SGLang's LoRA
        layers do); the other matrix is replicated. ``part``: the q/k/v slice adapted."""
        name = f"{self.name}:{part or ''}lora_{which}"
        splits_here = (self.split_dim == 0 and which == "B") or (self.split_dim == 1 and which == "A")
        if not splits_here:
            return ParameterLayout(name, self.tp_size)
        return replace(self, name=name, parts=self.parts if part == ALL_PARTS else (None,))


EngineLayouts = Dict[str, ParameterLayout]


def _split_of(engine_name: str) -> Optional[Split]:
    for suffix, split in SPLITS.items():
        if engine_name.endswith(suffix):
            return split
    return None


def build_layouts(config, tp_size: int, local_shapes: Mapping[str, Sequence[int]], device: str = "cpu",
                  vocab_ranges: Optional[Mapping[str, Tuple[int, int]]] = None, rank: int = 0) -> EngineLayouts:
    """Every engine parameter's layout from the engine's config (padded sizes; the real FFN size
    as ``original_intermediate_size``) and one rank's parameter shapes. Raises
    :class:`SGLangLayoutError` when a shape is not what the padding rules predict, or when SGLang's
    own vocabulary ranges (``vocab_ranges``: engine name -> this rank's ``[start, end)``) disagree."""
    layouts: EngineLayouts = {}
    real_ffn = real_intermediate_size(config)
    expected = {"vocab": padded_vocab_size(config.vocab_size),
                "intermediate": padded_intermediate_size(real_ffn, tp_size, device)}
    real = {"vocab": config.vocab_size, "intermediate": real_ffn}
    for name, shape in local_shapes.items():
        split = _split_of(name)
        if split is None:
            layouts[name] = ParameterLayout(name, tp_size)
            continue
        per_rank = shape[split.dim] // (len(split.parts) if split.dim == 0 and split.parts else 1)
        padded = expected.get(split.sized_by, per_rank * tp_size)
        if per_rank * tp_size != padded:
            raise SGLangLayoutError(
                f"engine parameter {name} holds {per_rank} entries per rank along dim {split.dim} at "
                f"tp_size={tp_size}; the padding rule predicts {padded} in all (SGLang changed its padding?)")
        layouts[name] = ParameterLayout(
            name, tp_size, split.dim, per_rank, real.get(split.sized_by, padded),
            tuple(split.parts) or (None,), loader_pads=split.sized_by == "intermediate")
    for name, (start, end) in (vocab_ranges or {}).items():
        lay = layouts[name]
        if (start, end) != (rank * lay.per_rank, rank * lay.per_rank + lay.real_count(rank)):
            raise SGLangLayoutError(
                f"SGLang gives rank {rank} vocabulary rows [{start}, {end}) of {name}; the layout expects "
                f"[{rank * lay.per_rank}, {rank * lay.per_rank + lay.real_count(rank)})")
    return layouts


def lora_layout(layouts: EngineLayouts, layer: int, module: str, which: str) -> ParameterLayout:
    """Layout of ``lora_A``/``lora_B`` of an engine LoRA target (``q_proj``…) in ``layer``."""
    target = LORA_TARGETS[module]
    return layouts[target.engine_weight(layer)].lora(which, target.part)
