"""The face shared by the task classes: one engine call with the head applied to the rows it reads.

``SGLangEncoderTask._encode`` validates HF-style inputs, asks the engine for the head's output on
the rows the head reads (:mod:`sglang_hf_bridge.sglang_models.heads`: each sequence's first token
for sequence heads and the pooler, every token for token heads) and shapes the results back into
padded ``[B, T, ...]`` tensors. Padded positions are computed as query-only tokens only when an
output covers them (every-token heads, hidden states, the base model's ``last_hidden_state``),
so a sequence classifier on right-padded batches runs the real tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from ..engine import EncoderCall, Logits
from ..errors import InputValidationError
from ..sglang_models.heads import rows_read
from .base import SGLangPreTrainedModel
from .inputs import ragged_batch, scatter_rows, validate_inputs

# Keywords transformers' forward takes that change nothing here (Trainer's loss bookkeeping,
# encoder-decoder arguments an encoder ignores).
IGNORED_FORWARD_KEYWORDS = frozenset({"num_items_in_batch", "return_loss", "head_mask", "encoder_hidden_states",
                                      "encoder_attention_mask", "use_cache", "past_key_values"})


@dataclass
class EncodedBatch:
    """``head``: ``[B, W]`` (first-token heads) or ``[B, T, W]`` (every-token heads);
    ``last_hidden``: ``[B, T, H]`` when asked; ``hidden_states``: embeddings + one per layer."""

    head: torch.Tensor
    last_hidden: Optional[torch.Tensor] = None
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None


class SGLangEncoderTask(SGLangPreTrainedModel):
    """Base of the task classes (sequence/token classification, question answering, base model).
    Inference-only as the masked LM: outputs carry no autograd graph."""

    @property
    def num_labels(self) -> int:
        """``config.num_labels``, as transformers' task classes expose it."""
        return self.config.num_labels

    def _check_forward_keywords(self, inputs_embeds, output_attentions, kwargs) -> None:
        if inputs_embeds is not None:
            raise InputValidationError("inputs_embeds is not supported: pass input_ids")
        if output_attentions:
            raise InputValidationError("output_attentions is not supported by the SGLang engine")
        unknown = set(kwargs) - IGNORED_FORWARD_KEYWORDS
        if unknown:
            raise TypeError(f"forward() got unexpected keyword arguments: {sorted(unknown)}")

    def _wants_hidden_states(self, output_hidden_states: Optional[bool]) -> bool:
        return bool(self.config.output_hidden_states if output_hidden_states is None else output_hidden_states)

    def _shaped(self, output, return_dict: Optional[bool]):
        """transformers' output class, or with ``return_dict=False`` its tuple (None fields left
        out, as transformers' ``to_tuple`` leaves them)."""
        wanted = self.config.return_dict if return_dict is None else return_dict
        return output if wanted else output.to_tuple()

    def _head_width(self) -> int:
        return self.head_spec.num_outputs(self.config) or self.config.hidden_size

    def _encode(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                adapter_names: Optional[Sequence[str]] = None, output_hidden_states: bool = False,
                last_hidden: bool = False) -> EncodedBatch:
        ids, mask, types, pos = validate_inputs(self.config, input_ids, attention_mask, token_type_ids, position_ids,
                                                self.absolute_position_ids)
        reads = rows_read(self.head_spec, self.config)
        reads_first = reads == "first"
        # transformers reads column 0 of every row: a real token unless the batch is left-padded.
        first_is_real = bool(mask[:, 0].all())
        every_position = output_hidden_states or last_hidden or not (reads_first and first_is_real or reads == "mean")
        prepared = ragged_batch(ids, mask, types, pos, with_query_only=every_position)
        self._assign_adapters(prepared, adapter_names)
        if reads == "mean":  # the mean of each row's real tokens (transformers masks the padding out)
            logits = Logits.MEAN
        elif reads_first and first_is_real:
            for seq in prepared.sequences:
                seq.logit_positions = [0]
            logits = Logits.SELECTED
        else:
            logits = Logits.ALL
        call = EncoderCall(sequences=prepared.sequences, logits=logits, output_hidden_states=output_hidden_states,
                           return_last_hidden=last_hidden)
        rows = self.runtime.forward(call).sequences
        width = self._head_width()
        if logits in (Logits.SELECTED, Logits.MEAN):
            head = torch.cat([r.logits for r in rows]).to(self.dtype)
        else:
            head = scatter_rows(prepared, [r.logits for r in rows], [r.query_only_logits for r in rows], width,
                                self.dtype)
            head = head[:, 0] if reads_first else head
        out = EncodedBatch(head=head)
        H = self.config.hidden_size
        if last_hidden:
            out.last_hidden = scatter_rows(prepared, [r.last_hidden for r in rows],
                                           [r.query_only_last_hidden for r in rows], H, self.dtype)
        if output_hidden_states:
            out.hidden_states = tuple(
                scatter_rows(prepared, [r.hidden_states[layer] for r in rows],
                             [r.query_only_hidden_states[layer] if r.query_only_hidden_states else None
                              for r in rows], H, self.dtype)
                for layer in range(self.config.num_hidden_layers + 1))
        return out
