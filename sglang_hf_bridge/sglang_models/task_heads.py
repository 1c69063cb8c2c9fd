"""SGLang-side task heads: the modules a :class:`~.heads.HeadShape` declares, on the encoder's rows.

Small (hidden x hidden at most), so every tensor-parallel rank holds them whole and computes the
same result from the same (all-reduced) hidden states; no collective is needed. transformers'
dropout is the identity in evaluation, so it has no module here.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn


class Pooler(nn.Module):
    """BERT's pooler (and RoBERTa's base model's): dense + tanh on the first token's state."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.linear = F.linear  # the engine's GEMM (engine/gemm.py), set by the model's use_linear

    def forward(self, x: torch.Tensor, own: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """``own``: an adapter's tensors (``dense.weight`` ...) in place of the module's."""
        return torch.tanh(_linear(self.linear, x, self.dense, "dense", own or {}))


class TaskHead(nn.Module):
    """``[dense -> activation [-> norm] ->] output``: RoBERTa's classification head (dense + tanh),
    ModernBERT's prediction head + classifier (dense -> its activation -> LayerNorm), a plain linear
    classifier (token classification, question answering, BERT after its pooler) without a dense."""

    def __init__(self, hidden_size: int, num_outputs: int, dense: bool,
                 activation: Callable[[torch.Tensor], torch.Tensor] = torch.tanh, dense_bias: bool = True,
                 norm: Optional[nn.LayerNorm] = None):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size, bias=dense_bias) if dense else None
        self.activation = activation
        self.norm = norm
        self.output = nn.Linear(hidden_size, num_outputs)
        self.linear = F.linear  # the engine's GEMM (engine/gemm.py), set by the model's use_linear

    def forward(self, x: torch.Tensor, own: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """``own``: an adapter's tensors (``dense.weight``, ``output.weight`` ...) in place of the module's."""
        own = own or {}
        if self.dense is not None:
            x = self.activation(_linear(self.linear, x, self.dense, "dense", own))
        if self.norm is not None:
            x = F.layer_norm(x, self.norm.normalized_shape, own.get("norm.weight", self.norm.weight),
                             own.get("norm.bias", self.norm.bias), self.norm.eps)
        return _linear(self.linear, x, self.output, "output", own)


def _linear(linear, x: torch.Tensor, layer: nn.Linear, name: str, own: Dict[str, torch.Tensor]) -> torch.Tensor:
    """``layer`` on ``x`` through ``linear``, with an adapter's ``{name}.weight`` / ``{name}.bias``
    where it has them."""
    return linear(x, own.get(f"{name}.weight", layer.weight), own.get(f"{name}.bias", layer.bias))
