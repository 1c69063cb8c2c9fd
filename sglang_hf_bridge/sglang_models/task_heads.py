"""SGLang-side task heads: the modules a :class:`~.heads.HeadShape` declares, on the encoder's rows.

Small (hidden x hidden at most), so every tensor-parallel rank holds them whole and computes the
same result from the same (all-reduced) hidden states; no collective is needed. transformers'
dropout is the identity in evaluation, so it has no module here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Pooler(nn.Module):
    """BERT's pooler (and RoBERTa's base model's): dense + tanh on the first token's state."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x))


class TaskHead(nn.Module):
    """``[dense -> tanh ->] output``: RoBERTa's classification head with ``dense``, a plain linear
    classifier (token classification, question answering, BERT after its pooler) without."""

    def __init__(self, hidden_size: int, num_outputs: int, dense: bool):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size) if dense else None
        self.output = nn.Linear(hidden_size, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            x = torch.tanh(self.dense(x))
        return F.linear(x, self.output.weight, self.output.bias)
