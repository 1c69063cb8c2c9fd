"""What MeZO minimises (``zo_objective``): the model's loss, a named objective, or a callable
``(logits, labels) -> values``; summed per shard so that data-parallel shards add up to the global mean."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Union

import torch

IGNORE_INDEX = -100  # transformers' label for "no loss here"


def negative_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per item: -1 where the arg-max of ``logits`` is the label, else 0 (items labelled -100 are
    left out). A non-differentiable objective: MeZO needs only its values."""
    keep = labels != IGNORE_INDEX
    return -(logits.argmax(-1)[keep] == labels[keep]).to(torch.float64)


class ModelLoss:
    """The objective that is the model's own ``loss`` output (cross-entropy for its labels)."""

    def __repr__(self) -> str:
        return "cross_entropy"


MODEL_LOSS = ModelLoss()
ObjectiveFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OBJECTIVES: Dict[str, Union[ModelLoss, ObjectiveFn]] = {
    "cross_entropy": MODEL_LOSS,
    "negative_accuracy": negative_accuracy,
}
Objective = Union[None, str, ObjectiveFn]


def resolve_objective(objective: Objective) -> Union[ModelLoss, ObjectiveFn]:
    """``zo_objective`` as what to compute: None is the model's loss, a name is looked up."""
    if objective is None:
        return MODEL_LOSS
    return OBJECTIVES[objective] if isinstance(objective, str) else objective


def _objective_name(objective: Objective) -> str:
    if objective is None or isinstance(objective, str):
        return objective or "cross_entropy"
    return f"{getattr(objective, '__module__', '?')}.{getattr(objective, '__qualname__', repr(objective))}"


def _items(labels: Optional[torch.Tensor], batch_size: int) -> int:
    """What the loss averages over: labelled items (transformers' -100 convention), else rows."""
    return int((labels != IGNORE_INDEX).sum()) if labels is not None else batch_size


def objective_sum(objective: Objective, logits: torch.Tensor, labels: torch.Tensor) -> Tuple[float, int]:
    """``(sum, count)`` of a callable objective's values on one batch: one value per example (or
    item) is summed; a single value is taken as the mean over the batch's labelled items. Sums and
    counts, not means, so that shards of different sizes add up to the global mean."""
    fn = resolve_objective(objective)
    values = torch.as_tensor(fn(logits, labels))
    if values.dim() == 0:
        count = _items(labels, logits.shape[0])
        return float(values) * count, count
    return float(values.detach().to(torch.float64).sum()), values.numel()
