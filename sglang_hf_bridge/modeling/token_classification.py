"""``*ForTokenClassification`` on the engine (NER, POS tagging): a linear classifier on every
token, padded positions included (as transformers computes them), and its cross-entropy loss."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import TokenClassifierOutput

from ..sglang_models.heads import TOKEN_CLASSIFICATION
from .encoder_task import SGLangEncoderTask
from .inputs import validate_labels


class SGLangTokenClassification(SGLangEncoderTask):
    """transformers' ``*ForTokenClassification`` interface."""

    head_spec = TOKEN_CLASSIFICATION

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        adapter_names: Optional[Sequence[str]] = None,
        **kwargs,
    ) -> Union[TokenClassifierOutput, Tuple]:
        """As ``RobertaForTokenClassification.forward``; labels ``[B, T]``, -100 ignored."""
        self._check_forward_keywords(inputs_embeds, output_attentions, kwargs)
        hidden = self._wants_hidden_states(output_hidden_states)
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, adapter_names, hidden)
        logits = out.head
        loss = None
        if labels is not None:
            num_labels = logits.shape[-1]
            labels = validate_labels(labels, logits.shape[:2], num_labels)
            loss = self._guard(F.cross_entropy(logits.view(-1, num_labels), labels.view(-1)))
        logits = self._guard(logits)
        return self._shaped(TokenClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states),
                            return_dict)
