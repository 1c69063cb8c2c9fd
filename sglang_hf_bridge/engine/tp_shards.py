"""Putting tensor-parallel shards back together (for full, unsharded saves and reads).

How each engine parameter is split comes from the weight map's :data:`SHARD_RULES`
(:mod:`sglang_hf_bridge.sglang_models.weight_map`); LoRA matrices follow their base layer.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from ..sglang_models.weight_map import LORA_ROW_PARALLEL, shard_rule


def merge_parameter(name: str, shards: List[torch.Tensor]) -> torch.Tensor:
    if len(shards) == 1:
        return shards[0]
    rule = shard_rule(name)
    if rule == "qkv":  # each rank holds [q_r; k_r; v_r]
        parts = [s.chunk(3, dim=0) for s in shards]
        return torch.cat([torch.cat([p[i] for p in parts], dim=0) for i in range(3)], dim=0)
    if rule in ("dim0", "vocab"):
        return torch.cat(shards, dim=0)
    if rule == "dim1":
        return torch.cat(shards, dim=1)
    return shards[0]


def merge_parameters(per_rank: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {name: merge_parameter(name, [r[name] for r in per_rank]) for name in per_rank[0]}


def merge_lora(module: str, which: str, shards: List[torch.Tensor]) -> torch.Tensor:
    """LoRA A/B shards: column-parallel targets split B's rows, row-parallel targets split A's
    columns; the other matrix is replicated."""
    if len(shards) == 1:
        return shards[0]
    row_parallel = module in LORA_ROW_PARALLEL
    if which == "A":
        return torch.cat(shards, dim=1) if row_parallel else shards[0]
    return shards[0] if row_parallel else torch.cat(shards, dim=0)
