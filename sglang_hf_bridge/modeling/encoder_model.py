"""``RobertaModel`` / ``BertModel`` on the engine (feature extraction, sentence embeddings): every
position's last hidden state, and the pooler on the first token."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

from ..sglang_models.heads import BASE_MODEL
from .encoder_task import SGLangEncoderTask


class SGLangEncoderModel(SGLangEncoderTask):
    """transformers' base-model interface (``last_hidden_state``, ``pooler_output``,
    ``hidden_states``); what sentence-transformers' ``Transformer`` module and the
    feature-extraction pipeline call."""

    head_spec = BASE_MODEL

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        adapter_names: Optional[Sequence[str]] = None,
        **kwargs,
    ) -> Union[BaseModelOutputWithPoolingAndCrossAttentions, Tuple]:
        """As ``RobertaModel.forward``."""
        self._check_forward_keywords(inputs_embeds, output_attentions, kwargs)
        hidden = self._wants_hidden_states(output_hidden_states)
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, adapter_names, hidden,
                           last_hidden=True)
        return self._shaped(self._base_output(out), return_dict)

    def _base_output(self, out):
        """transformers' output class of this family's base model (with its pooler)."""
        return BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=self._guard(out.last_hidden), pooler_output=self._guard(out.head),
            hidden_states=out.hidden_states)
