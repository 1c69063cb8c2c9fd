"""``*ForSequenceClassification`` on the engine: the head on each sequence's first token only
(RoBERTa's dense + tanh + out_proj at ``<s>``, BERT's pooler + classifier at ``[CLS]``), and
transformers' three losses chosen by ``config.problem_type``."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import SequenceClassifierOutput

from ..errors import InputValidationError
from ..sglang_models.heads import SEQUENCE_CLASSIFICATION
from .encoder_task import SGLangEncoderTask


class SGLangSequenceClassification(SGLangEncoderTask):
    """transformers' ``*ForSequenceClassification`` interface (text classification, NLI,
    cross-encoders, regression)."""

    head_spec = SEQUENCE_CLASSIFICATION

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
    ) -> Union[SequenceClassifierOutput, Tuple]:
        """As ``RobertaForSequenceClassification.forward``; ``adapter_names`` picks an adapter per
        row (``"__base__"`` = none)."""
        self._check_forward_keywords(inputs_embeds, output_attentions, kwargs)
        hidden = self._wants_hidden_states(output_hidden_states)
        out = self._encode(input_ids, attention_mask, token_type_ids, position_ids, adapter_names, hidden)
        logits = out.head
        loss = None if labels is None else self._guard(sequence_classification_loss(self.config, logits, labels))
        logits = self._guard(logits)
        return self._shaped(SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states),
                            return_dict)


def sequence_classification_loss(config, logits: torch.Tensor, labels) -> torch.Tensor:
    """transformers' loss: ``config.problem_type`` (set from the labels on first use, as
    transformers sets it) -- regression (MSE), single-label (cross-entropy), multi-label (BCE with
    logits). Labels are checked first: a class id outside ``[0, num_labels)`` is named, not left to
    an index error."""
    labels = torch.as_tensor(labels).to(logits.device)
    num_labels = logits.shape[-1]
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif num_labels > 1 and labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
        return F.mse_loss(logits, labels.to(logits.dtype))
    if config.problem_type == "single_label_classification":
        labels = labels.view(-1)
        if labels.is_floating_point():
            raise InputValidationError(f"labels must be class ids (integers) for single-label classification, got "
                                       f"dtype {labels.dtype}")
        bad = (labels != -100) & ((labels < 0) | (labels >= num_labels))
        if bool(bad.any()):
            raise InputValidationError(f"label {int(labels[bad][0])} is not a class id in [0, {num_labels})")
        return F.cross_entropy(logits.view(-1, num_labels), labels)
    if config.problem_type == "multi_label_classification":
        if tuple(labels.shape) != tuple(logits.shape):
            raise InputValidationError(f"multi-label labels must have shape {tuple(logits.shape)}, got "
                                       f"{tuple(labels.shape)}")
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    raise InputValidationError(f"config.problem_type={config.problem_type!r} is not one of 'regression', "
                               "'single_label_classification', 'multi_label_classification'")
