"""ModernBERT faces: transformers' ``ModernBertForMaskedLM``, ``...ForSequenceClassification``
(``classifier_pooling`` "cls" or "mean"), ``...ForTokenClassification``, ``...ForQuestionAnswering``
and ``ModernBertModel`` interfaces over the family's SGLang-side module
(``sglang_models/modernbert.py``)."""

from __future__ import annotations

import torch
from transformers import ModernBertConfig
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput

from ..sglang_models.families import MODERNBERT_FAMILY
from .encoder_model import SGLangEncoderModel
from .inputs import validate_labels
from .masked_lm import SGLangMaskedLM, masked_lm_loss
from .question_answering import SGLangQuestionAnswering
from .sequence_classification import SGLangSequenceClassification
from .token_classification import SGLangTokenClassification


class SGLangModernBertForMaskedLM(SGLangMaskedLM):
    """``ModernBertForMaskedLM``'s interface: dense -> activation -> norm -> decoder tied to the
    token embeddings (+ ``decoder.bias``). With ``config.sparse_prediction`` and labels, as
    transformers: logits only at the labelled tokens (``[N, vocab]``, row-major), computed only
    there (``compute_mlm_logits``)."""

    config_class = ModernBertConfig
    family = MODERNBERT_FAMILY

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                return_dict=None, output_hidden_states=None, output_attentions=None, inputs_embeds=None,
                adapter_names=None, **kwargs):
        """As ``ModernBertForMaskedLM.forward``."""
        if not (getattr(self.config, "sparse_prediction", False) and labels is not None):
            return super().forward(input_ids, attention_mask, token_type_ids, position_ids, labels, return_dict,
                                   output_hidden_states, output_attentions, inputs_embeds, adapter_names, **kwargs)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        labels = torch.as_tensor(labels)
        selected = labels != self.config.sparse_pred_ignore_index
        mask = torch.ones_like(selected) if attention_mask is None else torch.as_tensor(attention_mask).bool()
        if output_hidden_states or bool((selected & ~mask).any()):  # every position computed, then selected
            out = super().forward(input_ids, attention_mask, token_type_ids, position_ids, None, True,
                                  output_hidden_states, output_attentions, inputs_embeds, adapter_names, **kwargs)
            logits, hidden_states = out.logits[selected], out.hidden_states
        else:
            validate_labels(labels, tuple(torch.as_tensor(input_ids).shape), self.config.vocab_size,
                            self.config.sparse_pred_ignore_index)
            logits = self.compute_mlm_logits(input_ids, attention_mask, positions=selected,
                                             adapter_names=adapter_names, token_type_ids=token_type_ids,
                                             position_ids=position_ids)
            hidden_states = None
        loss = self._guard(masked_lm_loss(logits, labels[selected], self.config.vocab_size, num_items_in_batch))
        logits = self._guard(logits)
        if not (self.config.return_dict if return_dict is None else return_dict):
            return (loss, logits) + ((hidden_states,) if hidden_states is not None else ())
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=hidden_states)


class SGLangModernBertForSequenceClassification(SGLangSequenceClassification):
    """``ModernBertForSequenceClassification``'s interface: the first token's state
    (``classifier_pooling="cls"``) or the mean of the real tokens' (``"mean"``) -> head -> classifier."""

    config_class = ModernBertConfig
    family = MODERNBERT_FAMILY


class SGLangModernBertForTokenClassification(SGLangTokenClassification):
    """``ModernBertForTokenClassification``'s interface."""

    config_class = ModernBertConfig
    family = MODERNBERT_FAMILY


class SGLangModernBertForQuestionAnswering(SGLangQuestionAnswering):
    """``ModernBertForQuestionAnswering``'s interface."""

    config_class = ModernBertConfig
    family = MODERNBERT_FAMILY


class SGLangModernBertModel(SGLangEncoderModel):
    """``ModernBertModel``'s interface: ``last_hidden_state`` (after the final norm) and
    ``hidden_states``; no pooler."""

    config_class = ModernBertConfig
    family = MODERNBERT_FAMILY

    def _base_output(self, out) -> BaseModelOutput:
        return BaseModelOutput(last_hidden_state=self._guard(out.last_hidden), hidden_states=out.hidden_states)
