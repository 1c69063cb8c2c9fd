"""The SGLang-side encoder (RoBERTa, XLM-RoBERTa, CamemBERT and BERT share it: the same
post-LayerNorm encoder; each family has its own weight map) with the head the engine config names
(:mod:`.heads`: the masked-LM head, a task head, or the pooler alone).

SGLang 0.5.23 ships no masked-LM head, and its stock BERT/RoBERTa modules are named
``encoder.layer.N.attention.self.query``, which its LoRA machinery cannot target. This file
builds the same post-LayerNorm encoder from SGLang's parallel layers with LoRA-targetable names
(``layers.N.self_attn.qkv_proj``, ``o_proj``, ``mlp.fc_in``, ``mlp.down_proj``) and maps HF
checkpoint names onto them through the explicit table in :mod:`.weight_map` (which also says how
each parameter is split over tensor-parallel ranks).

Per-pass inputs the engine cannot express through ``ForwardBatch`` (HF position ids, token type
ids, "query-only" tokens standing for padded positions, hidden-state collection) are read from the
pass's scope (:mod:`.forward_context`); ``forward`` returns a :class:`~.forward_context.PassOutputs`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from sglang.srt.distributed.communication_op import tensor_model_parallel_all_reduce
from sglang.srt.distributed.parallel_state import (
    get_tensor_model_parallel_world_size,
)
from sglang.srt.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from sglang.srt.layers.radix_attention import AttentionType, RadixAttention
from sglang.srt.layers.vocab_parallel_embedding import VocabParallelEmbedding
from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from torch import nn

from .. import compat
from .attention import query_only_attention, sequence_attention
from .encoder_base import EncoderWithHeads
from .forward_context import PassOutputs, QueryOnlyState, current_pass


class RobertaEmbeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm. Position ids come from the caller."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids, position_ids, token_type_ids):
        x = self.word_embeddings(input_ids)
        x = x + self.token_type_embeddings(token_type_ids) + self.position_embeddings(position_ids)
        return self.layer_norm(x)


class RobertaSelfAttention(nn.Module):
    def __init__(self, config, layer_id: int, prefix: str):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.total_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.total_heads
        self.num_heads = self.total_heads // tp
        self.q_size = self.num_heads * self.head_dim
        self.scaling = self.head_dim**-0.5
        self.qkv_proj = QKVParallelLinear(
            hidden_size=config.hidden_size,
            head_size=self.head_dim,
            total_num_heads=self.total_heads,
            total_num_kv_heads=self.total_heads,
            bias=True,
            prefix=f"{prefix}.qkv_proj",
        )
        self.attn = RadixAttention(
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            scaling=self.scaling,
            num_kv_heads=self.num_heads,
            layer_id=layer_id,
            prefix=f"{prefix}.attn",
            attn_type=AttentionType.ENCODER_ONLY,
        )
        self.o_proj = RowParallelLinear(
            input_size=config.hidden_size,
            output_size=config.hidden_size,
            bias=True,
            prefix=f"{prefix}.o_proj",
        )

    def forward(self, x, forward_batch: ForwardBatch, query_only: Optional[QueryOnlyState] = None, segments=None):
        qkv, _ = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.q_size, self.q_size], dim=-1)
        if segments is None:
            out = self.attn(q, k, v, forward_batch)
        else:
            out = self._sequence_attention(q, k, v, segments)
        out, _ = self.o_proj(out)
        if query_only is None:
            return out, None
        return out, self._query_only_attention(query_only, k, v)

    def _sequence_attention(self, q, k, v, segments):
        """Bidirectional attention within each sequence, straight from this pass's q/k/v.

        The same SDPA SGLang's torch_native backend computes per request, without the round
        trip through the KV pool (write every K/V, gather them back): an encoder's K/V are never
        read again, so that round trip and the backend's per-request bookkeeping are pure overhead
        (measured in docs/benchmarks.md, "Latency"). One call per run of equal lengths (:mod:`.attention`)."""
        return sequence_attention(*(self._heads(t) for t in (q, k, v)), segments, self.scaling)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(-1, self.num_heads, self.head_dim)

    def _query_only_attention(self, query_only: QueryOnlyState, k, v):
        """Attention of padded positions: they query the real tokens of their row, nobody
        queries them (HF masks them as keys only)."""
        qkv = _query_only_linear(self.qkv_proj, query_only.states, query_only.lora, n_slices=3)
        out = self.query_only_attend(qkv[:, : self.q_size], query_only.key_segments, k, v)
        return _query_only_linear(self.o_proj, out, query_only.lora)

    def query_only_attend(self, q, key_segments, k, v):
        """Query-only rows' attention output (before ``o_proj``) from their queries ``q``: each
        sequence's query-only tokens attend to its real tokens (no gather of keys per query, no mask)."""
        return query_only_attention(self._heads(q), key_segments, self._heads(k), self._heads(v), self.scaling)


def _query_only_linear(layer, x, lora, n_slices: int = 1):
    """A (possibly LoRA-wrapped) SGLang linear layer applied to query-only rows, outside the
    engine batch: base weights, plus each row's adapter delta read from the LoRA pool slot."""
    base = compat.lora_base_layer(layer, adapter_active=lora is not None)
    out, _ = base(x)
    if lora is None:
        return out
    A_all, B_all = compat.lora_layer_buffers(layer, fused_qkv=n_slices == 3)
    for slot, rank, scaling, rows in lora.groups:
        A = A_all[slot, : n_slices * rank]
        B = B_all[slot, :, :rank]
        xa = x[rows] @ A.T
        if isinstance(base, RowParallelLinear) and get_tensor_model_parallel_world_size() > 1:
            xa = tensor_model_parallel_all_reduce(xa)  # A is sharded on the input dim
        width = B.shape[0] // n_slices
        delta = torch.cat(
            [xa[:, i * rank : (i + 1) * rank] @ B[i * width : (i + 1) * width].T for i in range(n_slices)], dim=-1
        )
        out[rows] += scaling * delta
    return out


class RobertaMLP(nn.Module):
    def __init__(self, config, prefix: str):
        super().__init__()
        self.fc_in = ColumnParallelLinear(
            config.hidden_size, config.intermediate_size, bias=True, prefix=f"{prefix}.fc_in"
        )
        self.down_proj = RowParallelLinear(
            config.intermediate_size, config.hidden_size, bias=True, prefix=f"{prefix}.down_proj"
        )
        if config.hidden_act not in ("gelu", "gelu_python"):
            raise ValueError(f"hidden_act={config.hidden_act!r} is not supported (only 'gelu')")
        self.linear_gelu = None  # the up-projection with GELU fused (engine/gemm.py), when the path has one
        self.up_base = None  # the plain layer under SGLang's LoRA wrapper of fc_in (set with linear_gelu)

    def forward(self, x, query_only_lora=None, query_only: bool = False):
        if not query_only:
            if self.linear_gelu is not None and not compat.lora_layer_active(self.fc_in):
                up = self.up_base  # column-parallel: this rank's rows, no collective
                return self.down_proj(self.linear_gelu(x, up.weight, up.bias))[0]
            return self.down_proj(F.gelu(self.fc_in(x)[0]))[0]
        h = F.gelu(_query_only_linear(self.fc_in, x, query_only_lora))
        return _query_only_linear(self.down_proj, h, query_only_lora)


class RobertaLayer(nn.Module):
    def __init__(self, config, layer_id: int, prefix: str):
        super().__init__()
        self.self_attn = RobertaSelfAttention(config, layer_id, prefix=f"{prefix}.self_attn")
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = RobertaMLP(config, prefix=f"{prefix}.mlp")
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x, forward_batch, query_only: Optional[QueryOnlyState] = None, segments=None):
        if query_only is not None and self._products_shareable(query_only):
            return self._forward_sharing_products(x, forward_batch, query_only, segments)
        attn, qo_attn = self.self_attn(x, forward_batch, query_only, segments)
        x = self.attn_norm(attn + x)
        x = self.ffn_norm(self.mlp(x) + x)
        if query_only is None:
            return x, None
        s = self.attn_norm(qo_attn + query_only.states)
        s = self.ffn_norm(self.mlp(s, query_only.lora, query_only=True) + s)
        return x, query_only.moved_to(s)

    def _products_shareable(self, query_only: QueryOnlyState) -> bool:
        """Whether query-only rows can go through the same products as the batch's: no adapter
        adds a delta anywhere in this layer (SGLang's LoRA layers place deltas by the batch's rows)."""
        attn, mlp = self.self_attn, self.mlp
        return query_only.lora is None and not any(
            compat.lora_layer_active(m) for m in (attn.qkv_proj, attn.o_proj, mlp.fc_in, mlp.down_proj))

    def _forward_sharing_products(self, x, forward_batch, query_only: QueryOnlyState, segments):
        """The batch's rows and its query-only rows through one product per linear (a padded
        batch has a few query-only rows; a product of their own reads each whole weight again --
        in bfloat16 on a 2-core CPU ~0.2 s per 128 padded prompts). Attention stays apart: real
        tokens attend to their sequence, query-only ones to their sequence's real tokens."""
        attn, n = self.self_attn, x.shape[0]
        rows = torch.cat([x, query_only.states])
        qkv = compat.lora_base_layer(attn.qkv_proj)(rows)[0]
        q, k, v = qkv[:n].split([attn.q_size, attn.q_size, attn.q_size], dim=-1)
        real = attn.attn(q, k, v, forward_batch) if segments is None else attn._sequence_attention(q, k, v, segments)
        padded = attn.query_only_attend(qkv[n:, : attn.q_size], query_only.key_segments, k, v)
        out = compat.lora_base_layer(attn.o_proj)(torch.cat([real, padded]))[0]
        rows = self.attn_norm(out + rows)
        rows = self.ffn_norm(self.mlp(rows) + rows)
        return rows[:n], query_only.moved_to(rows[n:])


class SGLangBridgeEncoder(EncoderWithHeads):
    """Encoder + the head the config names (:mod:`.heads`: masked LM by default; a task head --
    pooler, classification dense, output projection -- otherwise). ``forward`` returns the pass's
    hidden states (:class:`~.forward_context.PassOutputs`); the engine applies
    :meth:`compute_logits` only to the rows the head reads."""

    def __init__(self, *, config, quant_config=None, prefix: str = ""):
        super().__init__()
        if quant_config is not None:
            raise ValueError("quantized RoBERTa checkpoints are not supported")
        if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
            raise ValueError("only absolute position embeddings are supported")
        self.config = config
        self.embeddings = RobertaEmbeddings(config)
        self.layers = nn.ModuleList(
            [RobertaLayer(config, i, prefix=f"layers.{i}") for i in range(config.num_hidden_layers)]
        )
        self.init_heads()

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        forward_batch: ForwardBatch,
        input_embeds: Optional[torch.Tensor] = None,
        get_embedding: bool = True,
        **_,
    ) -> PassOutputs:
        p = current_pass()
        # Layers [start, stop): from start > 0 the states entering it come from the frozen-layer cache.
        start, stop = p.start_layer, p.stop_layer if p.stop_layer is not None else len(self.layers)
        x = self.embeddings(input_ids, p.position_ids, p.token_type_ids) if start == 0 else p.initial_hidden
        qo = None
        if p.query_only is not None:
            q = p.query_only
            states = self.embeddings(q.input_ids, q.position_ids, q.token_type_ids) if start == 0 \
                else p.query_only_initial
            qo = QueryOnlyState(states, q.key_segments, q.lora)
        collect = p.collect_hidden_states
        out = PassOutputs(hidden=x, hidden_states=[x] if collect else None,
                          query_only_hidden_states=[qo.states] if (qo is not None and collect) else None)
        for layer in self.layers[start:stop]:
            x, qo = layer(x, forward_batch, qo, p.attention_segments)
            if collect:
                out.hidden_states.append(x)
                if qo is not None:
                    out.query_only_hidden_states.append(qo.states)
        out.hidden = x
        out.query_only_last = qo.states if qo is not None else None
        return out

    def use_linear(self, linear, linear_gelu=None) -> None:
        """Also the FFN's up-projection with ``linear_gelu`` (GELU fused) where given."""
        super().use_linear(linear, linear_gelu)
        for layer in self.layers:
            layer.mlp.linear_gelu = linear_gelu
            layer.mlp.up_base = compat.lora_base_layer(layer.mlp.fc_in)


EntryClass = [SGLangBridgeEncoder]
