"""What every SGLang-side encoder shares, whatever its layers: the head the engine config names
(:mod:`.heads`: the masked-LM head, a task head, the pooler, or none), the head on the rows the
engine picks (:meth:`EncoderWithHeads.compute_logits`), parameter layouts, SGLang's LoRA hooks, and
loading through the family's weight map (fused checkpoint tensors split into their parts).

A family's module (:mod:`.encoder` for RoBERTa/BERT, :mod:`.modernbert`) builds ``embeddings``
(with ``word_embeddings``) and ``layers``, then calls :meth:`EncoderWithHeads.init_heads`.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
from sglang.srt.distributed.parallel_state import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from sglang.srt.model_loader.weight_utils import default_weight_loader
from torch import nn

from .. import compat
from .families import family_for, ties_word_embeddings
from .heads import MASKED_LM, HeadShape, head_of
from .layout import EngineLayouts, build_layouts
from .lm_head import MaskedLMHead
from .task_heads import Pooler, TaskHead
from .weight_map import ALL_PARTS, LOADER_SHARD_IDS, LORA_TARGETS, canonical_name, weight_map_for


def activation_named(name: str, config) -> Callable[[torch.Tensor], torch.Tensor]:
    """A head's activation: ``"tanh"``, or ``"config.<field>"`` -- transformers' own function
    (``ACT2FN``) for the name the config gives."""
    if name == "tanh":
        return torch.tanh
    from transformers.activations import ACT2FN

    return ACT2FN[getattr(config, name[len("config."):])]


class EncoderWithHeads(nn.Module):
    """Base of the SGLang-side encoders: ``forward`` returns the pass's hidden states
    (:class:`~.forward_context.PassOutputs`); the engine applies :meth:`compute_logits` only to the
    rows the head reads."""

    def head_options(self) -> Dict:
        """The family's head details (:class:`.lm_head.MaskedLMHead` keywords: activation, eps,
        biases); RoBERTa/BERT: the defaults."""
        return {}

    def init_heads(self) -> None:
        """Build the head the config names, then every parameter's layout."""
        config = self.config
        self.head_spec = head_of(config)
        self.lm_head = self.pooler = self.head = None
        options = self.head_options()
        if self.head_spec is MASKED_LM:
            self.lm_head = MaskedLMHead(config, self.embeddings.word_embeddings, **options)
        else:
            shape: HeadShape = self.head_spec.shape(family_for(config).name)
            self.pooler = Pooler(config.hidden_size) if shape.pooler else None
            if shape.output is not None:
                norm = nn.LayerNorm(config.hidden_size, eps=options.get("eps", 1e-12),
                                    bias=options.get("norm_bias", True)) if shape.norm else None
                self.head = TaskHead(config.hidden_size, self.head_spec.num_outputs(config), shape.dense is not None,
                                     activation_named(shape.activation, config),
                                     dense_bias=options.get("dense_bias", True), norm=norm)
        self.layouts = self._build_layouts()
        if self.lm_head is not None:
            self.lm_head.vocab_layout = self.layouts["embeddings.word_embeddings.weight"]

    def use_linear(self, linear, linear_gelu=None) -> None:
        """Compute the bridge's own linears (the masked-LM head, the pooler and task heads) with
        ``linear`` (SGLang's layers are routed by compat.route_linear_layers); families add their
        fused kernels."""
        for head in (self.lm_head, self.pooler, self.head):
            if head is not None:
                head.linear = linear

    def compute_logits(self, hidden: torch.Tensor, vocab_ids: Optional[torch.Tensor] = None, head=None):
        """The head on the rows it reads: masked-LM logits, or pooler -> task head. ``head``: an
        adapter's own head tensors (engine names) to use instead of the model's."""
        if self.lm_head is not None:
            return self.lm_head(hidden, vocab_ids)
        own = head or {}
        if self.pooler is not None:
            hidden = self.pooler(hidden, {k[len("pooler."):]: v for k, v in own.items() if k.startswith("pooler.")})
        if self.head is None:
            return hidden
        return self.head(hidden, {k[len("head."):]: v for k, v in own.items() if k.startswith("head.")})

    def _build_layouts(self) -> EngineLayouts:
        """Every parameter's layout, from this rank's shapes, checked against SGLang's own
        vocabulary ranges (read through compat)."""
        vocab = {"embeddings.word_embeddings.weight": self.embeddings.word_embeddings}
        if self.lm_head is not None and hasattr(self.lm_head, "decoder"):
            vocab["lm_head.decoder.weight"] = self.lm_head.decoder
        return build_layouts(
            self.config, get_tensor_model_parallel_world_size(),
            {n: tuple(p.shape) for n, p in self.named_parameters()},
            device=self.embeddings.word_embeddings.weight.device.type,
            vocab_ranges={n: compat.vocab_shard_range(e) for n, e in vocab.items()},
            rank=get_tensor_model_parallel_rank())

    # --- LoRA support hooks (SGLang's LoRA manager calls these) ------------------------------
    def get_hidden_dim(self, module_name: str, layer_idx: int):
        """(in, out) of the whole (padded, fused) layer ``module_name`` of ``layer_idx``."""
        target = next((t for t in LORA_TARGETS.values() if t.base == module_name), None)
        if target is None:
            raise NotImplementedError(f"LoRA on {module_name} is not supported")
        name = target.engine_weight(layer_idx)
        out_features, in_features = self.layouts[name].engine_full_shape(self.get_parameter(name).shape)
        return in_features, out_features

    # --- weights ------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]):
        """Load checkpoint tensors through the family's weight map (:mod:`.weight_map`), each
        padded as its layout says SGLang's loader wants it. Returns loaded engine names."""
        params = dict(self.named_parameters())
        names = weight_map_for(self.config)
        skip = set(names.skipped_when_loading(ties_word_embeddings(self.config)))
        loaded = set()
        for name, tensor in weights:
            if canonical_name(name) in skip:
                continue
            mapped = names.checkpoint_to_engine_name(name)
            if mapped is None:
                continue
            engine_name, shard = mapped
            if engine_name not in params:
                raise KeyError(f"checkpoint tensor {name!r} maps to unknown engine parameter {engine_name!r}")
            layout = self.layouts[engine_name]
            param = params[engine_name]
            loader = getattr(param, "weight_loader", default_weight_loader)
            if shard is None:
                loader(param, layout.padded_for_loading(tensor))
            elif shard == ALL_PARTS:  # one checkpoint tensor holding every part: load part by part
                for part, piece in zip(layout.parts, tensor.chunk(len(layout.parts), dim=0)):
                    loader(param, layout.padded_for_loading(piece), LOADER_SHARD_IDS.get(part, part))
            else:
                loader(param, layout.padded_for_loading(tensor), shard)
            loaded.add(engine_name if shard is None else f"{engine_name}:{shard}")
        return loaded

    def expected_loaded_names(self):
        names = set()
        for engine_name, _ in self.named_parameters():
            for _, shard in weight_map_for(self.config).engine_to_checkpoint_names(engine_name):
                names.add(engine_name if shard is None else f"{engine_name}:{shard}")
        return names


