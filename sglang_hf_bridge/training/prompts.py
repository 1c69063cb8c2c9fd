"""Prompt-based classification: "<sentence> It was <mask>." scored by label words at the mask.

The same head wraps this project's engine model (label-word logits through
``compute_mlm_logits(vocab_ids=...)``: the LM head runs only at the mask, only for those words)
and a plain transformers ``*ForMaskedLM`` (full forward, then the same slice), so an HF
baseline runs the identical task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PromptTemplate:
    """``template`` has ``{sentence}`` and ``{mask}``; ``label_words`` are single tokens, in label
    order, spelled as they appear after a space (" great", " terrible")."""

    template: str = "{sentence} It was {mask}."
    label_words: Sequence[str] = (" terrible", " great")

    def render(self, sentence: str, mask_token: str) -> str:
        return self.template.format(sentence=sentence, mask=mask_token)

    def label_word_ids(self, tokenizer) -> List[int]:
        ids = []
        for word in self.label_words:
            pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(pieces) != 1:
                raise ValueError(f"label word {word!r} is {len(pieces)} tokens for this tokenizer; it must be one")
            ids.append(pieces[0])
        return ids


class PromptCollator:
    """Tokenizes ``{"sentence", "label"}`` rows into padded prompt batches for the Trainer."""

    def __init__(self, tokenizer, template: PromptTemplate, max_length: int = 128):
        self.tokenizer, self.template, self.max_length = tokenizer, template, max_length

    def __call__(self, rows: List[Dict[str, object]]) -> Dict[str, torch.Tensor]:
        texts = [self.template.render(r["sentence"], self.tokenizer.mask_token) for r in rows]
        # Truncate the sentence, never the mask: left-truncate so the prompt's tail survives.
        side = self.tokenizer.truncation_side
        self.tokenizer.truncation_side = "left"
        try:
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length)
        finally:
            self.tokenizer.truncation_side = side
        enc["labels"] = torch.tensor([int(r["label"]) for r in rows], dtype=torch.long)
        return dict(enc)


def float32_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labels != -100, computed in float32 whatever the logits' dtype. A
    half-precision model's own loss is rounded to ~3 significant digits (bfloat16: steps of 2**-8
    near 1), far coarser than l+ - l- at MeZO's eps, which then reads 0 or a multiple of that step."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device),
                           ignore_index=-100)


class PromptClassifier(nn.Module):
    """Label-word logits at the mask + cross-entropy; works on the engine model and on HF's."""

    def __init__(self, model, label_word_ids: Sequence[int], mask_token_id: int):
        super().__init__()
        self.model = model
        self.label_word_ids = list(label_word_ids)
        self.mask_token_id = int(mask_token_id)
        self.config = model.config

    @property
    def uses_engine(self) -> bool:
        return hasattr(self.model, "compute_mlm_logits")

    def label_logits(self, input_ids, attention_mask=None,
                     adapter_names: Optional[Sequence[str]] = None) -> torch.Tensor:
        mask_pos = input_ids == self.mask_token_id
        if (mask_pos.sum(dim=1) != 1).any():
            raise ValueError("every prompt must contain exactly one mask token")
        if self.uses_engine:
            return self.model.compute_mlm_logits(input_ids, attention_mask, vocab_ids=self.label_word_ids,
                                                 mask_token_id=self.mask_token_id, adapter_names=adapter_names)
        encoder, head = _encoder_and_head(self.model)
        if encoder is None:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # grads when enabled
            return logits[mask_pos][:, self.label_word_ids]
        # The reference way (LM-BFF / MeZO): the LM head only at the mask, only the label words.
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        return head(hidden[mask_pos])[:, self.label_word_ids]

    def forward(self, input_ids, attention_mask=None, labels=None, adapter_names=None, **_):
        logits = self.label_logits(input_ids, attention_mask, adapter_names)
        loss = float32_cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits} if loss is not None else {"logits": logits}

    def save_pretrained(self, directory, **kwargs):
        return self.model.save_pretrained(directory, **kwargs)


def _encoder_and_head(model):
    """(encoder, LM head) of a transformers masked LM (PEFT-wrapped or not), or (None, None)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    encoder = getattr(base, getattr(base, "base_model_prefix", ""), None)
    head = getattr(base, "lm_head", None) or getattr(base, "cls", None)  # RoBERTa's / BERT's MLM head
    if encoder is None or head is None or encoder is base:
        return None, None
    return encoder, head


def accuracy_metrics(eval_pred) -> Dict[str, float]:
    """``compute_metrics`` for the Trainer: accuracy of the label-word argmax."""
    logits, labels = eval_pred
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((torch.as_tensor(logits).argmax(-1) == torch.as_tensor(labels)).float().mean())}
