"""RoBERTa's masked-LM head on SGLang's vocabulary-parallel embedding.

dense -> GELU -> LayerNorm -> decoder tied to the word embeddings + ``lm_head.bias``. Under tensor
parallelism each rank holds a vocabulary shard; full logits are all-gathered and unpadded by the
vocabulary's layout, label-word logits (``vocab_ids``) are computed on the owning rank and summed
across ranks.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from sglang.srt.distributed.communication_op import (
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from sglang.srt.distributed.parallel_state import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from sglang.srt.layers.vocab_parallel_embedding import VocabParallelEmbedding
from torch import nn

from .families import ties_word_embeddings


class MaskedLMHead(nn.Module):
    """``activation`` (GELU), ``eps`` (``config.layer_norm_eps``) and the biases are the family's:
    ModernBERT's head has its config's activation, ``norm_eps`` and optional biases."""

    def __init__(self, config, word_embeddings, activation: Callable[[torch.Tensor], torch.Tensor] = F.gelu,
                 eps: Optional[float] = None, dense_bias: bool = True, norm_bias: bool = True,
                 decoder_bias: bool = True):
        super().__init__()
        self.tp_rank = get_tensor_model_parallel_rank()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=dense_bias)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps if eps is None else eps,
                                       bias=norm_bias)
        self.activation = activation
        if ties_word_embeddings(config):
            # Not registered as a submodule: the decoder is tied, the embedding owns the weight.
            self._embedding = [word_embeddings]
        else:
            self.decoder = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
            self._embedding = [self.decoder]
        shard = word_embeddings.weight.shape[0]
        if decoder_bias:
            self.bias = nn.Parameter(torch.zeros(shard), requires_grad=False)
            self.bias.weight_loader = self._load_bias
        else:  # no checkpoint tensor: zeros, not a parameter (nothing to load, save or train)
            self.register_buffer("bias", torch.zeros(shard), persistent=False)
        self.vocab_layout = None  # the vocabulary's ParameterLayout, set by the model once built
        self.linear = F.linear  # the engine's GEMM (engine/gemm.py), set by the model's use_linear

    @property
    def word_embeddings(self):
        return self._embedding[0]

    def _rows(self) -> slice:
        """This rank's rows of the (real) vocabulary."""
        return self.vocab_layout.index(self.tp_rank, 1)[0]

    def _load_bias(self, param: nn.Parameter, loaded: torch.Tensor):
        param.data.zero_()
        self.vocab_layout.local(param.data, self.tp_rank).copy_(loaded[self._rows()])

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(self.activation(self.linear(hidden, self.dense.weight, self.dense.bias)))

    def forward(self, hidden: torch.Tensor, vocab_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.transform(hidden)
        emb = self.word_embeddings
        tp = get_tensor_model_parallel_world_size()
        if vocab_ids is None:
            logits = self.linear(h, emb.weight, self.bias)
            if tp > 1:
                shards = tensor_model_parallel_all_gather(logits, dim=-1).chunk(tp, dim=-1)
                return self.vocab_layout.gather(shards, dim=-1)
            return self.vocab_layout.local(logits, rank=0, dim=-1)
        if tp == 1:
            return F.linear(h, emb.weight[vocab_ids], self.bias[vocab_ids])
        rows = self._rows()
        start, end = rows.start, rows.stop
        local = (vocab_ids >= start) & (vocab_ids < end)
        idx = torch.where(local, vocab_ids - start, torch.zeros_like(vocab_ids))
        part = F.linear(h, emb.weight[idx], self.bias[idx]) * local.to(h.dtype)
        return tensor_model_parallel_all_reduce(part)

