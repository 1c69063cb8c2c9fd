"""What one ``ModelRunner.forward`` carries beyond SGLang's ``ForwardBatch``, and what it gives back.

SGLang calls ``model.forward(input_ids, positions, forward_batch)``; the side inputs an encoder
needs (HF position and token-type ids, query-only tokens, a layer range, hidden-state collection)
cannot ride in that call. They travel in a scoped context instead, as vLLM's forward context
does: the engine enters :func:`forward_context` around the runner call, the model reads
:func:`current_pass`, and returns a :class:`PassOutputs` (SGLang hands it back unchanged as the
runner's output, read through compat). Nothing is parked on the model between passes, and
concurrent threads each see their own pass.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Iterator, List, Optional, Tuple

import torch


@dataclass
class QueryOnlyLoRA:
    """Adapter slots of query-only tokens: ``(pool slot, rank, scaling, token rows)`` groups."""

    groups: List[tuple]


@dataclass
class QueryOnlyTokens:
    """Tokens that attend to a sequence but are not attended to (HF's padded positions).

    ``key_segments``: per sequence with query-only tokens, in order, ``(count, key start, key
    length)``: its next ``count`` query-only tokens attend to the pass's tokens
    ``[key start, key start + key length)`` (the sequence's real tokens).
    """

    input_ids: torch.Tensor  # [P]
    position_ids: torch.Tensor  # [P]
    token_type_ids: torch.Tensor  # [P]
    key_segments: List[Tuple[int, int, int]]
    lora: Optional[QueryOnlyLoRA] = None


@dataclass(frozen=True)
class QueryOnlyState:
    """Query-only tokens on their way through the layers: their states and whom they attend to."""

    states: torch.Tensor  # [P, H]
    key_segments: List[Tuple[int, int, int]]
    lora: Optional[QueryOnlyLoRA] = None

    def moved_to(self, states: torch.Tensor) -> "QueryOnlyState":
        return replace(self, states=states)


@dataclass(frozen=True)
class PassInputs:
    """Per-token side inputs of one pass."""

    position_ids: torch.Tensor
    token_type_ids: torch.Tensor
    collect_hidden_states: bool = False
    query_only: Optional[QueryOnlyTokens] = None
    # Run layers [start_layer, stop_layer) only; from start_layer > 0 the states entering it are given.
    start_layer: int = 0
    stop_layer: Optional[int] = None
    initial_hidden: Optional[torch.Tensor] = None  # [num_tokens, H]
    query_only_initial: Optional[torch.Tensor] = None  # [P, H]
    # Token count of each sequence, in order: set when the model computes attention itself ("sdpa").
    attention_segments: Optional[List[int]] = None


@dataclass
class PassOutputs:
    """What the model returns from one pass."""

    hidden: torch.Tensor  # [num_tokens, H] leaving the last layer run
    hidden_states: Optional[List[torch.Tensor]] = None  # entering the first layer run, then after each
    query_only_last: Optional[torch.Tensor] = None  # [P, H]
    query_only_hidden_states: Optional[List[torch.Tensor]] = None


_CURRENT: ContextVar[Optional[PassInputs]] = ContextVar("sglang_hf_bridge_pass", default=None)


@contextmanager
def forward_context(inputs: PassInputs) -> Iterator[PassInputs]:
    """The scope of one pass: :func:`current_pass` returns ``inputs`` inside it."""
    token = _CURRENT.set(inputs)
    try:
        yield inputs
    finally:
        _CURRENT.reset(token)


def current_pass() -> PassInputs:
    inputs = _CURRENT.get()
    if inputs is None:
        raise RuntimeError("the SGLang-side encoder ran outside forward_context(): its side inputs (position and "
                           "token-type ids) come from the engine (engine/rank.py)")
    return inputs
