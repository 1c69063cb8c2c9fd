"""SGLang-side task heads: the modules a :class:`~.heads.HeadShape` declares, on the encoder's rows.

Small (hidden x hidden at most), so every tensor-parallel rank holds them whole and computes the
same result from the same (all-reduced) hidden states; no collective is needed. transformers'
dropout is the identity in evaluation, so it has no module here.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn


class Pooler(nn.Module):
    """BERT's pooler (and RoBERTa's base model's): dense + tanh on the first token's state."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, own: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """``own``: an adapter's tensors (``dense.weight`` ...) in place of the module's."""
        return torch.tanh(_linear(x, self.dense, "dense", own or {}))


class TaskHead(nn.Module):
    """``[dense -> tanh ->] output``: RoBERTa's classification head with ``dense``, a plain linear
    classifier (token classification, question answering, BERT after its pooler) without."""

    def __init__(self, hidden_size: int, num_outputs: int, dense: bool):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size) if dense else None
        self.output = nn.Linear(hidden_size, num_outputs)

    def forward(self, x: torch.Tensor, own: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """``own``: an adapter's tensors (``dense.weight``, ``output.weight`` ...) in place of the module's."""
        own = own or {}
        if self.dense is not None:
            x = torch.tanh(_linear(x, self.dense, "dense", own))
        return _linear(x, self.output, "output", own)


def _linear(x: torch.Tensor, layer: nn.Linear, name: str, own: Dict[str, torch.Tensor]) -> torch.Tensor:
    """``layer`` on ``x``, with an adapter's ``{name}.weight`` / ``{name}.bias`` where it has them."""
    return F.linear(x, own.get(f"{name}.weight", layer.weight), own.get(f"{name}.bias", layer.bias))
