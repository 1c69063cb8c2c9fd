"""The named interface between the HF face and the engine: what one engine call takes and gives.

Everything here is plain tensors and lists; nothing knows about transformers' ``PreTrainedModel``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Hashable, List, Optional

import torch


@dataclass
class EncoderSequence:
    """One sequence as the engine sees it: real tokens only, HF position/type ids."""

    input_ids: List[int]
    position_ids: List[int]
    token_type_ids: Optional[List[int]] = None
    # Positions (indices into this sequence) where logits are wanted; None = none.
    logit_positions: Optional[List[int]] = None
    # HF padded positions of this row that must be computed as query-only tokens.
    query_only: Optional[List["QueryOnlySpec"]] = None
    lora_id: Optional[str] = None
    # States entering the call's start_layer (from the frozen-layer cache), [len, H] / [n_query_only, H].
    initial_hidden: Optional[torch.Tensor] = None
    query_only_initial: Optional[torch.Tensor] = None
    # Where this sequence's logits go when its caller holds the output (Logits.ALL only).
    logits_into: Optional["LogitsDestination"] = None


@dataclass
class LogitsDestination:
    """The caller's output rows for one sequence's logits (``forward``'s padded ``[T, V]`` row):
    the head writes there chunk by chunk instead of handing back one ``[tokens, V]`` tensor the
    caller would copy (for a masked LM the largest tensor of the call; docs/kernels.md).

    ``rows``: the row of each real token; ``query_only_rows``: per query-only token, the rows it
    stands for. Only the rank that holds ``tensor`` writes: pickled to another process (a
    tensor-parallel worker) the tensor stays behind, the rows travel (every rank must group the
    head's products the same way: its collectives run in lockstep)."""

    tensor: Optional[torch.Tensor]
    rows: List[int]
    query_only_rows: List[List[int]] = field(default_factory=list)

    def __getstate__(self):
        return {**self.__dict__, "tensor": None}


@dataclass
class QueryOnlySpec:
    input_id: int
    position_id: int
    token_type_id: int = 0


class Logits(str, Enum):
    """Where a call wants the head's logits."""

    ALL = "all"  # every real token
    SELECTED = "selected"  # each sequence's logit_positions
    NONE = "none"  # nowhere: no head
    MEAN = "mean"  # once per sequence, on the mean of its tokens' states (mean-pooling heads)


@dataclass
class EncoderCall:
    """One engine call: sequences plus what to compute for them."""

    sequences: List[EncoderSequence]
    logits: Logits = Logits.SELECTED
    vocab_ids: Optional[List[int]] = None
    output_hidden_states: bool = False
    return_last_hidden: bool = False
    # Layer range [start_layer, stop_layer); last_hidden is then the state leaving layer stop_layer - 1.
    start_layer: int = 0
    stop_layer: Optional[int] = None
    frozen: Optional["FrozenPlan"] = None

    def __post_init__(self) -> None:
        self.logits = Logits(self.logits)  # "all" / "selected" / "none" as plain strings too

    def output_signature(self) -> tuple:
        """What is asked of the rows -- everything but the sequences and the frozen plan: calls with
        equal signatures can share a pass, and a cached result is only reused under its own."""
        return (self.logits, tuple(self.vocab_ids) if self.vocab_ids is not None else None,
                self.output_hidden_states, self.return_last_hidden, self.start_layer, self.stop_layer)


@dataclass
class FrozenPlan:
    """Frozen-layer cache instructions for one call, decided once by the front and applied by
    every rank to its own store (so tensor-parallel ranks hold the same entries).

    ``layer`` None: only apply ``evict`` and run the call normally."""

    layer: Optional[int]
    keys: List[Hashable]  # one per sequence
    compute: List[int]  # sequences whose states entering ``layer`` are computed and stored now
    evict: List[Hashable]


@dataclass
class SequenceResult:
    logits: Optional[torch.Tensor] = None  # [n_positions, V'] for the requested positions
    hidden_states: Optional[List[torch.Tensor]] = None  # per layer [len, H]
    last_hidden: Optional[torch.Tensor] = None  # [len, H]
    query_only_logits: Optional[torch.Tensor] = None  # [n_query_only, V']
    query_only_hidden_states: Optional[List[torch.Tensor]] = None  # per layer [n_q, H]
    query_only_last_hidden: Optional[torch.Tensor] = None  # [n_q, H] (with return_last_hidden)


@dataclass
class EncoderResult:
    sequences: List[SequenceResult] = field(default_factory=list)
