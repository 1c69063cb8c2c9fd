"""Putting tensor-parallel shards back together (for saving full, unsharded checkpoints).

Which dimension SGLang shards, by engine parameter name: column-parallel layers and the
vocabulary split rows (dim 0), row-parallel layers split columns (dim 1), the fused qkv_proj
holds ``[q_r; k_r; v_r]`` per rank, everything else is replicated.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from .versions import writes

ROW_SPLIT_SUFFIXES = ("o_proj.weight", "down_proj.weight")
COLUMN_SPLIT_SUFFIXES = ("fc_in.weight", "fc_in.bias", "word_embeddings.weight", "lm_head.bias",
                         "lm_head.decoder.weight")
QKV_SUFFIXES = ("qkv_proj.weight", "qkv_proj.bias")


def merge_parameter(name: str, shards: List[torch.Tensor]) -> torch.Tensor:
    if len(shards) == 1:
        return shards[0]
    if name.endswith(QKV_SUFFIXES):
        parts = [s.chunk(3, dim=0) for s in shards]
        return torch.cat([torch.cat([p[i] for p in parts], dim=0) for i in range(3)], dim=0)
    if name.endswith(COLUMN_SPLIT_SUFFIXES):
        return torch.cat(shards, dim=0)
    if name.endswith(ROW_SPLIT_SUFFIXES):
        return torch.cat(shards, dim=1)
    return shards[0]


def merge_parameters(per_rank: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {name: merge_parameter(name, [r[name] for r in per_rank]) for name in per_rank[0]}


def merge_lora(module: str, which: str, shards: List[torch.Tensor]) -> torch.Tensor:
    """LoRA A/B shards: column-parallel targets split B's rows, row-parallel targets split A's
    columns; the other matrix is replicated."""
    if len(shards) == 1:
        return shards[0]
    row_parallel = module in ("o_proj", "down_proj")
    if which == "A":
        return torch.cat(shards, dim=1) if row_parallel else shards[0]
    return shards[0] if row_parallel else torch.cat(shards, dim=0)


@writes(None)
def adapter_views_cloned(runtime, lora_id: str):
    """Run on every rank: that rank's A/B views of an adapter, copied to CPU."""
    adapter = runtime.adapters.adapters[lora_id]
    return {key: (a.detach().cpu().clone(), b.detach().cpu().clone()) for key, (a, b) in adapter.views.items()}
