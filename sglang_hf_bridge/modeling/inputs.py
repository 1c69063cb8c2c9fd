"""Validating HF-style padded inputs and turning them into ragged engine sequences (and back).

A row's real tokens are its ``attention_mask == 1`` positions. Padded positions are not run as
tokens: HF masks them as keys only, so every padded position with the same (token, position,
type) in a row has the same output; the engine computes one "query-only" token per distinct
triple (normally one per padded row) and the result is copied to those positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from ..engine import EncoderSequence, LogitsDestination, QueryOnlySpec
from ..engine.head_output import copy_rows
from ..errors import InputValidationError
from ..sglang_models.families import family_for


@dataclass
class PreparedBatch:
    sequences: List[EncoderSequence]
    real_index: List[torch.Tensor]  # per row: column indices of real tokens
    padded_groups: List[List[Tuple[int, torch.Tensor]]]  # per row: (query-only slot, columns)
    shape: Tuple[int, int]


def _refuse_meta(name: str, value: torch.Tensor) -> None:
    """A meta tensor has a shape but no values: nothing to run (torch fails deep inside)."""
    if value.device.type == "meta":
        raise InputValidationError(f"{name} is on the meta device (a tensor without data): pass real values, "
                                   "e.g. on cpu")


def _as_2d_long(name: str, value, shape=None, allow_broadcast_rows: bool = False) -> Optional[torch.Tensor]:
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except Exception as e:  # noqa: BLE001 - report what the user passed
            raise InputValidationError(f"{name} must be a tensor of integers, got {type(value).__name__}") from e
    _refuse_meta(name, value)
    if name == "attention_mask" and (value.is_floating_point() or value.dtype == torch.bool):
        # transformers takes float and bool masks; exactly 0/1 converts to long without loss
        bad = ~((value == 0) | (value == 1))
        if bool(bad.any()):
            raise InputValidationError(f"attention_mask must contain only 0 and 1, got {value[bad][0].item()} "
                                       f"(dtype {value.dtype})")
    elif value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise InputValidationError(f"{name} must hold integers, got dtype {value.dtype}")
    if value.dim() != 2:
        raise InputValidationError(f"{name} must have shape [batch, seq_len], got {tuple(value.shape)}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        if not (allow_broadcast_rows and value.shape[0] == 1 and value.shape[1] == shape[1]):
            raise InputValidationError(
                f"{name} has shape {tuple(value.shape)} but input_ids has shape {tuple(shape)}"
            )
        value = value.expand(shape)
    return value.to("cpu", torch.long)


def absolute_position_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """BERT's position ids: 0..T-1 in every row, padding included."""
    return torch.arange(input_ids.shape[1]).expand_as(input_ids)


def create_position_ids(input_ids: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """RoBERTa's position ids: real tokens count from padding_idx + 1, pad tokens get padding_idx."""
    mask = input_ids.ne(padding_idx).long()
    return torch.cumsum(mask, dim=1) * mask + padding_idx


def validate_and_prepare(
    config,
    input_ids,
    attention_mask=None,
    token_type_ids=None,
    position_ids=None,
    with_query_only: bool = True,
    absolute_positions: bool = False,
) -> Tuple[PreparedBatch, torch.Tensor]:
    """Check everything HF would trip over (or silently index out of range) and build the
    engine's ragged sequences. Returns the batch and the [B, T] 0/1 attention mask. Default
    position ids are RoBERTa's (counted from ``pad_token_id + 1`` over real tokens) or, with
    ``absolute_positions``, BERT's (0..T-1)."""
    ids, mask, types, pos = validate_inputs(config, input_ids, attention_mask, token_type_ids, position_ids,
                                            absolute_positions)
    return ragged_batch(ids, mask, types, pos, with_query_only), mask


def validate_inputs(config, input_ids, attention_mask, token_type_ids, position_ids, absolute_positions=False):
    """``(ids, mask, types, positions)`` as ``[B, T]`` long CPU tensors, or InputValidationError."""
    ids = _as_2d_long("input_ids", input_ids)
    if ids is None:
        raise InputValidationError("input_ids is required (inputs_embeds is not supported)")
    B, T = ids.shape
    if B == 0:
        raise InputValidationError("empty batch: input_ids has no rows")
    if T == 0:
        raise InputValidationError("empty sequence: input_ids has no columns")
    vocab = config.vocab_size
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        bad = ids[(ids < 0) | (ids >= vocab)][0].item()
        raise InputValidationError(f"token id {bad} is out of the vocabulary [0, {vocab})")
    mask = _as_2d_long("attention_mask", attention_mask, (B, T))
    if mask is None:
        mask = torch.ones_like(ids)
    elif not bool(((mask == 0) | (mask == 1)).all()):
        raise InputValidationError("attention_mask must contain only 0 and 1")
    types = _as_2d_long("token_type_ids", token_type_ids, (B, T))
    if types is None:
        types = torch.zeros_like(ids)
    elif getattr(config, "type_vocab_size", None) is None:  # ModernBERT: no token-type embeddings
        if bool(types.any()):
            raise InputValidationError(f"token_type_ids must be all 0 or None: {config.model_type} has no token "
                                       "type embeddings")
    elif int(types.min()) < 0 or int(types.max()) >= config.type_vocab_size:
        raise InputValidationError(f"token_type_ids must lie in [0, {config.type_vocab_size})")
    pos = _as_2d_long("position_ids", position_ids, (B, T), allow_broadcast_rows=True)
    if pos is None:
        pos = absolute_position_ids(ids) if absolute_positions else create_position_ids(ids, config.pad_token_id)
    max_pos = config.max_position_embeddings
    if int(pos.min()) < 0:
        raise InputValidationError(f"position_ids must be >= 0, got {int(pos.min())}")
    if int(pos.max()) >= max_pos:
        limit = family_for(config).max_sequence_length(config)
        raise InputValidationError(
            f"sequence too long: position id {int(pos.max())} does not fit max_position_embeddings={max_pos} "
            f"(at most {limit} tokens per sequence for this model)"
        )
    lengths = mask.sum(dim=1)
    if int(lengths.min()) == 0:
        row = int((lengths == 0).nonzero()[0])
        raise InputValidationError(f"row {row} has no tokens (attention_mask is all zeros)")
    return ids, mask, types, pos


def ragged_batch(ids, mask, types, pos, with_query_only: bool) -> PreparedBatch:
    """One engine sequence per row (real tokens only), plus the query-only specs that stand for
    each row's padded positions (one per distinct (token, position, type))."""
    B, T = ids.shape
    sequences, real_index, groups = [], [], []
    for b in range(B):
        real = mask[b].nonzero().flatten()
        specs: List[QueryOnlySpec] = []
        row_groups: List[Tuple[int, torch.Tensor]] = []
        if with_query_only and len(real) < T:
            keyed: Dict[Tuple[int, int, int], List[int]] = {}
            for col in (mask[b] == 0).nonzero().flatten().tolist():
                keyed.setdefault((int(ids[b, col]), int(pos[b, col]), int(types[b, col])), []).append(col)
            for (tok, p, tt), cols in keyed.items():
                row_groups.append((len(specs), torch.tensor(cols)))
                specs.append(QueryOnlySpec(tok, p, tt))
        sequences.append(EncoderSequence(input_ids=ids[b, real].tolist(), position_ids=pos[b, real].tolist(),
                                         token_type_ids=types[b, real].tolist(), query_only=specs or None))
        real_index.append(real)
        groups.append(row_groups)
    return PreparedBatch(sequences, real_index, groups, (B, T))


def scatter_rows(prepared: PreparedBatch, per_row_real, per_row_query, width: int, dtype, fill=0.0) -> torch.Tensor:
    """Rebuild a padded ``[B, T, width]`` tensor from per-row real-token and query-only values."""
    return write_rows(padded_output(prepared, width, dtype, fill), prepared, per_row_real, per_row_query)


def padded_output(prepared: PreparedBatch, width: int, dtype, fill=0.0) -> torch.Tensor:
    """The ``[B, T, width]`` output of a padded batch; filled only where no row will be written."""
    B, T = prepared.shape
    covered = sum(len(prepared.real_index[b]) + sum(len(cols) for _, cols in prepared.padded_groups[b])
                  for b in range(B))
    # Every position written (real tokens and query-only groups): no fill pass over [B, T, V].
    return torch.empty((B, T, width), dtype=dtype) if covered == B * T else torch.full((B, T, width), fill, dtype=dtype)


def logits_destinations(prepared: PreparedBatch, out: torch.Tensor) -> None:
    """Let the engine write each row's logits straight into ``out`` (engine/head_output.py)."""
    for b, seq in enumerate(prepared.sequences):
        seq.logits_into = LogitsDestination(out[b], prepared.real_index[b].tolist(),
                                            [cols.tolist() for _, cols in prepared.padded_groups[b]])


def write_rows(out: torch.Tensor, prepared: PreparedBatch, per_row_real, per_row_query) -> torch.Tensor:
    """``out`` with each row's real-token and query-only values written (rows the engine already
    wrote come back as None)."""
    for b in range(prepared.shape[0]):
        if per_row_real[b] is not None:
            copy_rows(out[b], prepared.real_index[b], per_row_real[b].to(out.dtype))
        if per_row_query[b] is not None:
            for slot, cols in prepared.padded_groups[b]:
                out[b, cols] = per_row_query[b][slot].to(out.dtype)
    return out


def _integer_tensor(name: str, value) -> torch.Tensor:
    """``value`` as an integer tensor; floats, bools and non-numbers are refused, not truncated."""
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except Exception as e:  # noqa: BLE001 - report what the user passed
            raise InputValidationError(f"{name} must be integers, got {type(value).__name__}") from e
        if value.numel() == 0:
            value = value.long()  # an empty list has no dtype to judge (torch makes it float)
    _refuse_meta(name, value)
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise InputValidationError(f"{name} must hold integers, got dtype {value.dtype}")
    return value.to("cpu", torch.long)


def validate_labels(labels, shape, vocab_size: int, ignore_index: int = -100) -> torch.Tensor:
    """``[B, T]`` integer labels: token ids in ``[0, vocab_size)`` or ``ignore_index``."""
    labels = _integer_tensor("labels", labels)
    if tuple(labels.shape) != tuple(shape):
        raise InputValidationError(f"labels has shape {tuple(labels.shape)}, expected {tuple(shape)}")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        raise InputValidationError(
            f"label {int(labels[bad][0])} is neither a token id in [0, {vocab_size}) nor the ignore index "
            f"{ignore_index}")
    return labels


def validate_vocab_ids(vocab_ids, vocab_size: int) -> List[int]:
    """Output columns for ``compute_mlm_logits``: a non-empty list of ids in ``[0, vocab_size)``."""
    vocab = _integer_tensor("vocab_ids", vocab_ids).flatten()
    if vocab.numel() == 0:
        raise InputValidationError("vocab_ids is empty: it needs at least one token id")
    if int(vocab.min()) < 0 or int(vocab.max()) >= vocab_size:
        raise InputValidationError(f"vocab_ids must lie in [0, {vocab_size})")
    return vocab.tolist()


def validate_token_id(name: str, value, vocab_size: int) -> int:
    """One integer token id in ``[0, vocab_size)`` (e.g. ``mask_token_id``)."""
    tensor = _integer_tensor(name, value)
    if tensor.numel() != 1:
        raise InputValidationError(f"{name} must be one integer, got shape {tuple(tensor.shape)}")
    token = int(tensor)
    if not 0 <= token < vocab_size:
        raise InputValidationError(f"{name}={token} is outside the vocabulary [0, {vocab_size})")
    return token
