"""RoBERTa's masked-LM head on SGLang's vocabulary-parallel embedding.

dense -> GELU -> LayerNorm -> decoder tied to the word embeddings + ``lm_head.bias``. Under tensor
parallelism each rank holds a vocabulary shard; full logits are all-gathered, label-word logits
(``vocab_ids``) are computed on the owning rank and summed across ranks.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from sglang.srt.distributed.communication_op import (
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from sglang.srt.distributed.parallel_state import get_tensor_model_parallel_world_size
from sglang.srt.layers.vocab_parallel_embedding import VocabParallelEmbedding
from torch import nn

from .. import compat
from .families import ties_word_embeddings


class MaskedLMHead(nn.Module):
    def __init__(self, config, word_embeddings):
        super().__init__()
        self.vocab_size = config.vocab_size
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if ties_word_embeddings(config):
            # Not registered as a submodule: the decoder is tied, the embedding owns the weight.
            self._embedding = [word_embeddings]
        else:
            self.decoder = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
            self._embedding = [self.decoder]
        shard = word_embeddings.weight.shape[0]
        self.bias = nn.Parameter(torch.zeros(shard), requires_grad=False)
        self.bias.weight_loader = self._load_bias

    @property
    def word_embeddings(self):
        return self._embedding[0]

    def _load_bias(self, param: nn.Parameter, loaded: torch.Tensor):
        start, end = compat.vocab_shard_range(self.word_embeddings)
        param.data.zero_()
        param.data[: end - start].copy_(loaded[start:end])

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(F.gelu(self.dense(hidden)))

    def forward(self, hidden: torch.Tensor, vocab_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.transform(hidden)
        emb = self.word_embeddings
        tp = get_tensor_model_parallel_world_size()
        if vocab_ids is None:
            logits = F.linear(h, emb.weight, self.bias)
            if tp > 1:
                logits = tensor_model_parallel_all_gather(logits, dim=-1)
                return _unpad_gathered(logits, emb, self.vocab_size)
            return logits[:, : self.vocab_size]
        if tp == 1:
            return F.linear(h, emb.weight[vocab_ids], self.bias[vocab_ids])
        start, end = compat.vocab_shard_range(emb)
        local = (vocab_ids >= start) & (vocab_ids < end)
        idx = torch.where(local, vocab_ids - start, torch.zeros_like(vocab_ids))
        part = F.linear(h, emb.weight[idx], self.bias[idx]) * local.to(h.dtype)
        return tensor_model_parallel_all_reduce(part)


def _unpad_gathered(logits: torch.Tensor, emb, vocab_size: int) -> torch.Tensor:
    """All-gathered shards are ``[shard0 | shard1 | ...]`` each padded: keep the real rows."""
    tp = get_tensor_model_parallel_world_size()
    pieces = []
    per_rank = compat.vocab_rows_per_rank(emb)
    for r in range(tp):
        lo = r * per_rank
        start = min(r * per_rank, vocab_size)
        n = max(0, min(vocab_size - start, per_rank))
        pieces.append(logits[:, lo : lo + n])
    return torch.cat(pieces, dim=-1)
