"""``*ForQuestionAnswering`` on the engine (extractive QA): ``qa_outputs`` on every token, split
into start and end logits, and transformers' span loss (positions outside the input ignored)."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import QuestionAnsweringModelOutput

from ..errors import InputValidationError
from ..sglang_models.heads import QUESTION_ANSWERING
from .encoder_task import SGLangEncoderTask


class SGLangQuestionAnswering(SGLangEncoderTask):
    """transformers' ``*ForQuestionAnswering`` interface."""

    head_spec = QUESTION_ANSWERING

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        start_positions: Optional[torch.Tensor] = None,
        end_positions: Optional[torch.Tensor] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        adapter_names: Optional[Sequence[str]] = None,
        **kwargs,
    ) -> Union[QuestionAnsweringModelOutput, Tuple]:
        """As ``RobertaForQuestionAnswering.forward``."""
        self._check_forward_keywords(inputs_embeds, output_attentions, kwargs)
        if self.config.num_labels != 2:
            raise InputValidationError(f"question answering needs config.num_labels=2 (start, end), got "
                                       f"{self.config.num_labels}")
        hidden = self._wants_hidden_states(output_hidden_states)
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, adapter_names, hidden)
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in out.head.split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = self._guard(span_loss(start_logits, end_logits, start_positions, end_positions))
        start_logits, end_logits = self._guard(start_logits), self._guard(end_logits)
        return self._shaped(QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                                         hidden_states=out.hidden_states), return_dict)


def span_loss(start_logits, end_logits, start_positions, end_positions) -> torch.Tensor:
    """transformers' QA loss: the mean of the start and end cross-entropies; positions beyond the
    input are clamped to its length and ignored."""
    positions = []
    for name, value in (("start_positions", start_positions), ("end_positions", end_positions)):
        value = torch.as_tensor(value)
        if value.is_floating_point():
            raise InputValidationError(f"{name} must be integers, got dtype {value.dtype}")
        positions.append(value.squeeze(-1) if value.dim() > 1 else value)
    ignored = start_logits.size(1)
    start, end = (p.to(start_logits.device).clamp(0, ignored) for p in positions)
    return (F.cross_entropy(start_logits, start, ignore_index=ignored)
            + F.cross_entropy(end_logits, end, ignore_index=ignored)) / 2
