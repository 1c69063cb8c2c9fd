"""The SGLang-side ModernBERT encoder, computed as transformers' ``ModernBertModel`` computes it.

Token embeddings -> LayerNorm; pre-norm layers (layer 0 without its attention norm): the fused
``Wqkv`` (engine ``self_attn.qkv_proj``, q/k/v split per rank as every family's), rotary
positions with each layer type's own theta, attention -- full on every
``global_attn_every_n_layers``-th layer, else a bidirectional window of ``local_attention // 2``
tokens each side --, ``Wo``; GeGLU (``Wi`` = [input; gate] as ``mlp.gate_up_proj``, act(input) *
gate, ``Wo`` as ``mlp.down_proj``); a final LayerNorm. Biases and norm biases as the config says.

Attention runs on each sequence's own q/k/v (``encoder_attention="sdpa"``): a windowed layer
computes only the keys within reach of each block of queries (:func:`windowed_attention`), so a
long document costs O(length x window) there, not O(length^2). SGLang 0.5.23's attention backends
cannot express a bidirectional window; the face refuses ``encoder_attention="backend"`` for a
model with windowed layers (``Family.sliding_window``), and this module fails loudly if asked.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from sglang.srt.distributed.parallel_state import get_tensor_model_parallel_world_size
from sglang.srt.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from sglang.srt.layers.radix_attention import AttentionType, RadixAttention
from sglang.srt.layers.vocab_parallel_embedding import VocabParallelEmbedding
from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from torch import nn

from .attention import query_only_attention, sequence_attention
from .encoder import _query_only_linear
from .encoder_base import EncoderWithHeads
from .forward_context import PassOutputs, QueryOnlyState, current_pass

SLIDING = "sliding_attention"


def layer_types(config) -> List[str]:
    """Each layer's attention: ``config.layer_types`` (transformers fills it from the older
    ``global_attn_every_n_layers``: every n-th layer, from layer 0, is full attention)."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    every = int(getattr(config, "global_attn_every_n_layers", 3))
    return ["full_attention" if i % every == 0 else SLIDING for i in range(config.num_hidden_layers)]


def rope_tables(config, device) -> Dict[str, Tuple[torch.Tensor, float]]:
    """``layer type -> (inv_freq, attention scaling)``, as transformers' ModernBERT rotary module
    computes them (its own formula for the default type, transformers' initialisers otherwise)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim = config.hidden_size // config.num_attention_heads
    tables = {}
    for kind in sorted(set(layer_types(config))):
        params = config.rope_parameters[kind]
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            base = params["rope_theta"]
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            tables[kind] = (inv_freq.to(device), 1.0)
        elif rope_type in ("dynamic", "longrope"):  # these change with the sequence length per call
            raise ValueError(f"ModernBERT rope_type={rope_type!r} ({kind}) is not supported by the engine")
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, device, layer_type=kind)
            tables[kind] = (inv_freq.to(device=device, dtype=torch.float), float(scaling))
    return tables


def rotary_cos_sin(table: Tuple[torch.Tensor, float], positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin ``[tokens, head_dim]`` for ``positions``, in float then cast (as transformers)."""
    inv_freq, scaling = table
    freqs = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x``: ``[tokens, heads, head_dim]``; computed in float, returned in ``x``'s dtype."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


def windowed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: float,
                       block: int = 128) -> torch.Tensor:
    """Bidirectional attention of one sequence where token i sees tokens j with |i - j| <= window
    (transformers' sliding-window mask). ``q``/``k``/``v``: ``[heads, n, head_dim]``.

    Queries go in blocks of ``block``; each block attends to the ``block + 2 * window`` keys around
    it under a band mask (keys outside the window weigh exactly 0, as under the full mask)."""
    h, n, d = q.shape
    if n <= window + 1:  # every pair is within the window
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if n <= block + 2 * window:
        idx = torch.arange(n, device=q.device)
        band = (idx[:, None] - idx[None, :]).abs() <= window
        return F.scaled_dot_product_attention(q, k, v, attn_mask=band, scale=scale)
    blocks = -(-n // block)
    tail = blocks * block - n
    span = block + 2 * window
    qb = F.pad(q, (0, 0, 0, tail)).view(h, blocks, block, d).transpose(0, 1)
    kb = F.pad(k, (0, 0, window, tail + window)).unfold(1, span, block).permute(1, 0, 3, 2)
    vb = F.pad(v, (0, 0, window, tail + window)).unfold(1, span, block).permute(1, 0, 3, 2)
    i = torch.arange(block, device=q.device)[:, None]
    j = torch.arange(span, device=q.device)[None, :]
    band = (j >= i) & (j <= i + 2 * window)  # query b*block+i, key b*block-window+j: |query - key| <= window
    key_pos = torch.arange(blocks, device=q.device)[:, None] * block - window + torch.arange(span, device=q.device)
    mask = band[None] & ((key_pos >= 0) & (key_pos < n))[:, None, :]
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask[:, None], scale=scale)
    return out.transpose(0, 1).reshape(h, blocks * block, d)[:, :n]


def _norm(config) -> nn.LayerNorm:
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)


class ModernBertEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layer_norm = _norm(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(self.word_embeddings(input_ids))


class ModernBertSelfAttention(nn.Module):
    def __init__(self, config, layer_id: int, kind: str, prefix: str):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads // tp
        self.q_size = self.num_heads * self.head_dim
        self.scaling = self.head_dim**-0.5
        self.kind = kind
        self.window = config.local_attention // 2 if kind == SLIDING else None
        self.qkv_proj = QKVParallelLinear(
            hidden_size=config.hidden_size, head_size=self.head_dim, total_num_heads=config.num_attention_heads,
            total_num_kv_heads=config.num_attention_heads, bias=config.attention_bias, prefix=f"{prefix}.qkv_proj")
        self.attn = RadixAttention(num_heads=self.num_heads, head_dim=self.head_dim, scaling=self.scaling,
                                   num_kv_heads=self.num_heads, layer_id=layer_id, prefix=f"{prefix}.attn",
                                   attn_type=AttentionType.ENCODER_ONLY)
        self.o_proj = RowParallelLinear(config.hidden_size, config.hidden_size, bias=config.attention_bias,
                                        prefix=f"{prefix}.o_proj")

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, self.num_heads, self.head_dim)

    def forward(self, x, rope, forward_batch: ForwardBatch, segments, query_only=None, qo_rope=None,
                key_positions=None, query_positions=None):
        q, k, v = self._qkv(self.qkv_proj(x)[0], rope)
        if segments is None:
            if self.window is not None:
                raise RuntimeError("a sliding-window ModernBERT layer cannot run on SGLang's attention backend; "
                                   "use encoder_attention='sdpa'")
            out = self.attn(q.flatten(1), k.flatten(1), v.flatten(1), forward_batch)
        elif self.window is None:
            out = sequence_attention(q, k, v, segments, self.scaling)
        else:
            outs = []
            for qs, ks, vs in zip(q.split(segments), k.split(segments), v.split(segments)):
                o = windowed_attention(*(t.transpose(0, 1) for t in (qs, ks, vs)), self.window, self.scaling)
                outs.append(o.transpose(0, 1).reshape(-1, self.q_size))
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
        out = self.o_proj(out)[0]
        if query_only is None:
            return out, None
        return out, self._query_only_attention(query_only, qo_rope, k, v, key_positions, query_positions)

    def _qkv(self, qkv: torch.Tensor, rope):
        q, k, v = qkv.split([self.q_size] * 3, dim=-1)
        cos, sin = rope
        return apply_rotary(self._heads(q), cos, sin), apply_rotary(self._heads(k), cos, sin), self._heads(v)

    def _query_only_attention(self, query_only: QueryOnlyState, rope, k, v, key_positions, query_positions):
        """Padded positions query their row's real tokens (within the window on a windowed layer;
        one with none in reach gets a zero attention output, as torch's SDPA gives transformers)."""
        qkv = _query_only_linear(self.qkv_proj, query_only.states, query_only.lora, n_slices=3)
        q = apply_rotary(self._heads(qkv[:, : self.q_size]), *rope)
        if self.window is None:
            out = query_only_attention(q, query_only.key_segments, k, v, self.scaling)
            return _query_only_linear(self.o_proj, out, query_only.lora)
        outs, first = [], 0
        for count, start, length in query_only.key_segments:
            qs = q[first:first + count].transpose(0, 1)
            ks, vs = (t[start:start + length].transpose(0, 1) for t in (k, v))
            mask = None
            if self.window is not None:
                qpos, kpos = query_positions[first:first + count], key_positions[start:start + length]
                mask = (qpos[:, None] - kpos[None, :]).abs() <= self.window
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=self.scaling).transpose(0, 1))
            first += count
        out = (outs[0] if len(outs) == 1 else torch.cat(outs)).reshape(-1, self.q_size)
        return _query_only_linear(self.o_proj, out, query_only.lora)


class ModernBertMLP(nn.Module):
    """GeGLU: ``gate_up_proj`` = [input; gate] (transformers' ``Wi``), act(input) * gate, ``down_proj``."""

    def __init__(self, config, prefix: str):
        super().__init__()
        from transformers.activations import ACT2FN

        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2,
                                                       bias=config.mlp_bias, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias,
                                           prefix=f"{prefix}.down_proj")
        self.act = ACT2FN[config.hidden_activation]

    def forward(self, x, query_only_lora=None, query_only: bool = False):
        if query_only:
            up = _query_only_linear(self.gate_up_proj, x, query_only_lora, n_slices=2)
        else:
            up = self.gate_up_proj(x)[0]
        inp, gate = up.chunk(2, dim=-1)
        h = self.act(inp) * gate
        if query_only:
            return _query_only_linear(self.down_proj, h, query_only_lora)
        return self.down_proj(h)[0]


class ModernBertLayer(nn.Module):
    def __init__(self, config, layer_id: int, prefix: str):
        super().__init__()
        self.kind = layer_types(config)[layer_id]
        self.attn_norm = _norm(config) if layer_id > 0 else None  # transformers: Identity in layer 0
        self.self_attn = ModernBertSelfAttention(config, layer_id, self.kind, prefix=f"{prefix}.self_attn")
        self.mlp_norm = _norm(config)
        self.mlp = ModernBertMLP(config, prefix=f"{prefix}.mlp")

    def forward(self, x, ropes, forward_batch, p, qo: Optional[QueryOnlyState], qo_ropes):
        """The pass's tokens (``p``: the pass's inputs) and, beside them, its query-only tokens."""
        h = x if self.attn_norm is None else self.attn_norm(x)
        qo_in = None
        if qo is not None:
            qo_in = qo.moved_to(qo.states if self.attn_norm is None else self.attn_norm(qo.states))
        attn, qo_attn = self.self_attn(
            h, ropes[self.kind], forward_batch, p.attention_segments, qo_in,
            qo_ropes[self.kind] if qo_ropes else None, p.position_ids,
            p.query_only.position_ids if p.query_only is not None else None)
        x = x + attn
        x = x + self.mlp(self.mlp_norm(x))
        if qo is None:
            return x, None
        s = qo.states + qo_attn
        s = s + self.mlp(self.mlp_norm(s), qo.lora, query_only=True)
        return x, qo.moved_to(s)


class SGLangModernBertEncoder(EncoderWithHeads):
    """ModernBERT + the head the config names (masked LM: ``head`` -> ``decoder``; task heads:
    ``head`` -> ``classifier``; the base model: none)."""

    def __init__(self, *, config, quant_config=None, prefix: str = ""):
        super().__init__()
        if quant_config is not None:
            raise ValueError("quantized ModernBERT checkpoints are not supported")
        self.config = config
        self.embeddings = ModernBertEmbeddings(config)
        self.layers = nn.ModuleList([ModernBertLayer(config, i, prefix=f"layers.{i}")
                                     for i in range(config.num_hidden_layers)])
        self.final_norm = _norm(config)
        self.rope = rope_tables(config, self.final_norm.weight.device)
        self.init_heads()

    def head_options(self) -> Dict:
        from transformers.activations import ACT2FN

        c = self.config
        return {"activation": ACT2FN[c.classifier_activation], "eps": c.norm_eps, "dense_bias": c.classifier_bias,
                "norm_bias": c.norm_bias, "decoder_bias": c.decoder_bias}

    def _ropes(self, positions: torch.Tensor, dtype: torch.dtype):
        return {kind: rotary_cos_sin(table, positions, dtype) for kind, table in self.rope.items()}

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch,
                input_embeds: Optional[torch.Tensor] = None, get_embedding: bool = True, **_) -> PassOutputs:
        p = current_pass()
        n_layers = len(self.layers)
        start, stop = p.start_layer, p.stop_layer if p.stop_layer is not None else n_layers
        x = self.embeddings(input_ids) if start == 0 else p.initial_hidden
        ropes = self._ropes(p.position_ids, x.dtype)
        qo = qo_ropes = None
        if p.query_only is not None:
            q = p.query_only
            qo = QueryOnlyState(self.embeddings(q.input_ids) if start == 0 else p.query_only_initial,
                                q.key_segments, q.lora)
            qo_ropes = self._ropes(q.position_ids, x.dtype)
        collect = p.collect_hidden_states
        out = PassOutputs(hidden=x, hidden_states=[x] if collect else None,
                          query_only_hidden_states=[qo.states] if (qo is not None and collect) else None)
        for layer in self.layers[start:stop]:
            x, qo = layer(x, ropes, forward_batch, p, qo, qo_ropes)
            if collect:
                out.hidden_states.append(x)
                if qo is not None:
                    out.query_only_hidden_states.append(qo.states)
        if stop == n_layers:  # transformers' last hidden state (and last of hidden_states) is normed
            x = self.final_norm(x)
            qo = qo.moved_to(self.final_norm(qo.states)) if qo is not None else None
            if collect:
                out.hidden_states[-1] = x
                if qo is not None:
                    out.query_only_hidden_states[-1] = qo.states
        out.hidden = x
        out.query_only_last = qo.states if qo is not None else None
        return out


EntryClass = [SGLangModernBertEncoder]
