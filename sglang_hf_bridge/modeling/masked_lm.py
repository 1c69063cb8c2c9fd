"""The masked-LM face shared by every family: transformers' ``*ForMaskedLM`` interface (forward,
``compute_mlm_logits``, saving) on an SGLang engine. The per-family classes (``roberta.py``,
``bert.py``) only name their config class, base prefix and position-id scheme."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import MaskedLMOutput

from ..engine import EncoderCall, Logits
from ..errors import InputValidationError
from .base import SGLangPreTrainedModel
from .inputs import (
    logits_destinations,
    padded_output,
    scatter_rows,
    validate_and_prepare,
    validate_labels,
    validate_token_id,
    validate_vocab_ids,
    write_rows,
)


class SGLangMaskedLM(SGLangPreTrainedModel):
    """A masked LM whose forward passes run on SGLang (the family classes subclass it).

    Inference-only: outputs carry no autograd graph, and ``.backward()`` on them raises
    :class:`~sglang_hf_bridge.errors.InferenceOnlyError`. ``hidden_states`` (when asked) are all
    layers as in HF: the embedding output plus one tensor per encoder layer.
    """

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        return_dict: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        adapter_names: Optional[Sequence[str]] = None,
        **kwargs,
    ) -> Union[MaskedLMOutput, Tuple]:
        """As ``RobertaForMaskedLM.forward``. ``adapter_names`` picks an adapter per row
        (``"__base__"`` = none), run as one SGLang batch; default: the active adapter.

        Trainer's loss keywords: ``num_items_in_batch`` (its count of labelled tokens over the
        accumulated batches) makes the loss ``sum of token losses / num_items_in_batch``, as
        transformers' ``ForMaskedLMLoss``; ``return_loss`` is accepted (the loss comes from
        ``labels``)."""
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        kwargs.pop("return_loss", None)
        if inputs_embeds is not None:
            raise InputValidationError("inputs_embeds is not supported: pass input_ids")
        if output_attentions:
            raise InputValidationError("output_attentions is not supported by the SGLang engine")
        unknown = set(kwargs) - {"head_mask", "encoder_hidden_states", "encoder_attention_mask"}
        if unknown:
            raise TypeError(f"forward() got unexpected keyword arguments: {sorted(unknown)}")
        return_dict = self.config.return_dict if return_dict is None else return_dict
        output_hidden_states = bool(
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        prepared, _ = validate_and_prepare(self.config, input_ids, attention_mask, token_type_ids, position_ids,
                                           absolute_positions=self.absolute_position_ids)
        V = self.config.vocab_size
        if labels is not None:
            labels = validate_labels(labels, prepared.shape, V)
        self._assign_adapters(prepared, adapter_names)
        logits = padded_output(prepared, V, self.dtype)
        logits_destinations(prepared, logits)  # the engine writes the logits straight into them
        call = EncoderCall(sequences=prepared.sequences, logits=Logits.ALL, output_hidden_states=output_hidden_states)
        result = self.runtime.forward(call)
        rows = result.sequences
        write_rows(logits, prepared, [r.logits for r in rows], [r.query_only_logits for r in rows])
        hidden_states = None
        if output_hidden_states:
            H = self.config.hidden_size
            hidden_states = tuple(
                scatter_rows(
                    prepared,
                    [r.hidden_states[layer] for r in rows],
                    [r.query_only_hidden_states[layer] if r.query_only_hidden_states else None for r in rows],
                    H,
                    self.dtype,
                )
                for layer in range(self.config.num_hidden_layers + 1)
            )
        loss = None
        if labels is not None:
            loss = self._guard(masked_lm_loss(logits, labels, V, num_items_in_batch))
        logits = self._guard(logits)
        if not return_dict:
            out = (logits,) + ((hidden_states,) if hidden_states is not None else ())
            return ((loss,) + out) if loss is not None else out
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=hidden_states)

    def compute_mlm_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        positions: Optional[Union[torch.Tensor, Sequence[Tuple[int, int]]]] = None,
        vocab_ids: Optional[Union[torch.Tensor, Sequence[int]]] = None,
        mask_token_id: Optional[int] = None,
        adapter_names: Optional[Sequence[str]] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Logits only where they are needed: the fast path for prompt-based training/eval.

        ``positions``: ``None`` (every ``<mask>`` token, row-major), a bool ``[B, T]`` tensor,
        or ``(row, column)`` pairs (an ``[N, 2]`` tensor; output rows follow their order).
        ``vocab_ids``: restrict the output columns to these ids (e.g. label words). The mask id
        is ``mask_token_id``, else ``model.mask_token_id``: ``config.mask_token_id``, else the
        checkpoint's tokenizer files (read once by ``from_pretrained``), else an error asking for it.
        ``token_type_ids`` / ``position_ids``: as in ``forward`` (sentence-pair prompts).
        ``adapter_names``: one adapter per row, as in ``forward``.
        Returns ``[N, V]`` or ``[N, len(vocab_ids)]``.
        """
        prepared, mask = validate_and_prepare(self.config, input_ids, attention_mask, token_type_ids, position_ids,
                                              absolute_positions=self.absolute_position_ids,
                                              with_query_only=False)
        vocab = None if vocab_ids is None else validate_vocab_ids(vocab_ids, self.config.vocab_size)
        mask_id, mask_source = self._mask_token_id(mask_token_id)
        self._assign_adapters(prepared, adapter_names)
        ids = torch.as_tensor(input_ids).to("cpu", torch.long)
        pairs = _resolve_positions(positions, ids, mask, mask_id)
        if positions is None and not pairs:
            raise InputValidationError(
                f"no mask token in input_ids: looked for id {mask_id} ({mask_source}). Pass your tokenizer's id as "
                "mask_token_id=tokenizer.mask_token_id, or the positions to score as positions= (a bool [B, T] "
                "mask or (row, column) pairs)")
        # Engine results come back row by row; remember where each requested pair lands.
        row_major = sorted(range(len(pairs)), key=lambda i: pairs[i])
        for b, seq in enumerate(prepared.sequences):
            col_to_real = {int(c): i for i, c in enumerate(prepared.real_index[b])}
            seq.logit_positions = [col_to_real[pairs[i][1]] for i in row_major if pairs[i][0] == b]
        call = EncoderCall(sequences=prepared.sequences, logits=Logits.SELECTED, vocab_ids=vocab)
        result = self.runtime.forward(call)
        width = self.config.vocab_size if vocab is None else len(vocab)
        parts = [r.logits for r in result.sequences if r.logits is not None]
        if not parts:
            return torch.empty((0, width), dtype=self.dtype)
        flat = torch.cat(parts).to(self.dtype)
        out = torch.empty_like(flat)
        out[torch.tensor(row_major, dtype=torch.long)] = flat
        return self._guard(out)

    def _mask_token_id(self, explicit: Optional[int]) -> Tuple[int, str]:
        """``(id, where it comes from)``: the argument, else ``model.mask_token_id``."""
        if explicit is not None:
            return validate_token_id("mask_token_id", explicit, self.config.vocab_size), "the mask_token_id argument"
        default, source = self._mask_token
        if default is None:
            raise InputValidationError(
                f"this model has no mask token id ({source}): pass mask_token_id=tokenizer.mask_token_id, set "
                "model.mask_token_id, or give the positions to score as positions=")
        return validate_token_id("model.mask_token_id", default, self.config.vocab_size), source


def _resolve_positions(positions, ids: torch.Tensor, mask: torch.Tensor, mask_id: int) -> List[Tuple[int, int]]:
    B, T = ids.shape
    if positions is None:
        sel = (ids == mask_id) & (mask == 1)
        return [tuple(x) for x in sel.nonzero().tolist()]
    positions = torch.as_tensor(positions)
    if positions.dtype == torch.bool:
        if tuple(positions.shape) != (B, T):
            raise InputValidationError(f"a boolean positions mask must have shape {(B, T)}")
        pairs = positions.nonzero().tolist()
    else:
        if positions.dim() != 2 or positions.shape[1] != 2 or positions.is_floating_point():
            raise InputValidationError("positions must be a bool [B, T] mask or integer (row, column) pairs [N, 2]")
        pairs = positions.tolist()
    for r, c in pairs:
        if not (0 <= r < B and 0 <= c < T):
            raise InputValidationError(f"position ({r}, {c}) is outside input_ids of shape {(B, T)}")
        if int(mask[r, c]) == 0:
            raise InputValidationError(f"position ({r}, {c}) is a padded position (attention_mask is 0)")
    return [(int(r), int(c)) for r, c in pairs]


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, num_items_in_batch=None):
    """transformers' masked-LM loss: the mean token cross-entropy over labels != -100
    (``RobertaForMaskedLM``); with ``num_items_in_batch`` the float32 sum divided by it
    (``transformers.loss.loss_utils.ForMaskedLMLoss`` / ``fixed_cross_entropy``)."""
    labels = labels.view(-1).to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits.view(-1, vocab_size), labels, ignore_index=-100)
    loss = F.cross_entropy(logits.float().view(-1, vocab_size), labels, ignore_index=-100, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch
