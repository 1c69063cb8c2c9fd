"""LoRA adapters on the engine: load into SGLang's LoRA manager, keep them resident in its
memory pool, hand out views of their A/B matrices, unload.

Engine-side keys are ``(layer, module)`` with module one of ``q_proj k_proj v_proj o_proj
fc_in down_proj``; PEFT names live in the face (``sglang_hf_bridge.lora``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from .. import compat

# engine module -> (pool buffer name, slice index within the stacked buffer)
MODULE_SLICES = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "o_proj": ("o_proj", 0),
    "fc_in": ("fc_in", 0),
    "down_proj": ("down_proj", 0),
}
MODULE_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
                 "o_proj": "self_attn", "fc_in": "mlp", "down_proj": "mlp"}

AdapterKey = Tuple[int, str]  # (layer, engine module)


class AdapterError(ValueError):
    """An adapter the engine cannot load (shapes, rank, modules)."""


@dataclass
class EngineAdapter:
    lora_id: str
    name: str
    rank: int
    scaling: float
    weights: Dict[AdapterKey, Tuple[torch.Tensor, torch.Tensor]]  # (A [r, in], B [out, r])
    views: Dict[AdapterKey, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def module_dims(config, module: str) -> Tuple[int, int]:
    h, i = config.hidden_size, config.intermediate_size
    return {"fc_in": (h, i), "down_proj": (i, h)}.get(module, (h, h))


class AdapterPool:
    """Adapters resident in one ModelRunner's LoRA memory pool."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.adapters: Dict[str, EngineAdapter] = {}  # by lora_id
        self._lora_refs = {}

    @property
    def _manager(self):
        mr = self.runtime.model_runner
        manager = getattr(mr, "lora_manager", None)
        if manager is None:
            raise AdapterError("this model was loaded with enable_lora=False: reload it with LoRA enabled")
        return manager

    @property
    def limits(self):
        return self.runtime.config.lora

    def load(self, name: str, weights: Dict[AdapterKey, Tuple[torch.Tensor, torch.Tensor]], rank: int,
             scaling: float, lora_id: Optional[str] = None) -> EngineAdapter:
        from sglang.srt.lora.lora_registry import LoRARef

        manager = self._manager
        limits = self.limits
        if len(self.adapters) >= limits.max_adapters:
            raise AdapterError(f"the engine holds at most {limits.max_adapters} adapters (max_loras); delete one first")
        if rank > limits.max_rank:
            raise AdapterError(f"adapter rank {rank} is above the engine's max_lora_rank={limits.max_rank}")
        cfg = self.runtime.model.config
        tensors = {}
        layers = {layer for layer, _ in weights}
        for (layer, module), (a, b) in weights.items():
            fan_in, fan_out = module_dims(cfg, module)
            if tuple(a.shape) != (rank, fan_in) or tuple(b.shape) != (fan_out, rank):
                raise AdapterError(
                    f"layer {layer} {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                    f"rank {rank} and this model's ({fan_in} -> {fan_out}) projection"
                )
        for layer in sorted(layers):
            if layer >= cfg.num_hidden_layers:
                raise AdapterError(f"adapter has weights for layer {layer}; the model has {cfg.num_hidden_layers}")
            present = {m for (l, m) in weights if l == layer}
            # SGLang stacks q/k/v and assumes q and v are present: fill absent slices with zeros.
            if present & {"q_proj", "k_proj", "v_proj"}:
                for m in ("q_proj", "k_proj", "v_proj"):
                    if m not in present:
                        fan_in, fan_out = module_dims(cfg, m)
                        weights[(layer, m)] = (torch.zeros(rank, fan_in), torch.zeros(fan_out, rank))
        for (layer, module), (a, b) in weights.items():
            prefix = f"base_model.model.layers.{layer}.{MODULE_PARENT[module]}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = a.detach().to(torch.float32).contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.detach().to(torch.float32).contiguous()
        targets = sorted({m for _, m in weights})
        ref = LoRARef(lora_name=name, lora_path=f"sglang-hf-bridge://{name}", pinned=False,
                      **({"lora_id": lora_id} if lora_id else {}))
        # SGLang scales by lora_alpha / r; pass the alpha that yields the wanted scaling.
        config_dict = {"peft_type": "LORA", "r": rank, "lora_alpha": scaling * rank, "target_modules": targets}
        with compat.no_pinning():
            result = self.runtime.model_runner.load_lora_adapter_from_tensors(ref, tensors, config_dict)
        if not getattr(result, "success", True):
            raise AdapterError(f"SGLang refused adapter {name!r}: {result.error_message}")
        adapter = EngineAdapter(ref.lora_id, name, rank, scaling, weights)
        self.runtime.caches.versions.bump_adapter(ref.lora_id)
        self.adapters[ref.lora_id] = adapter
        self._lora_refs[ref.lora_id] = ref
        self.make_resident(adapter)
        return adapter

    def make_resident(self, adapter: EngineAdapter) -> None:
        """Bring the adapter into the pool now (a one-token pass) and take views of its slot."""
        from .types import EncoderCall, EncoderSequence

        self.runtime.forward_on_rank(EncoderCall(
            sequences=[EncoderSequence(input_ids=[0], position_ids=[self.runtime.model.config.pad_token_id + 1],
                                       lora_id=adapter.lora_id)],
            logits="none",
        ))
        pool = self._manager.memory_pool
        slot = pool.get_buffer_id(adapter.lora_id)
        r = adapter.rank
        for (layer, module) in adapter.weights:
            buffer, index = MODULE_SLICES[module]
            a_buf = pool.A_buffer[buffer][layer]
            b_buf = pool.B_buffer[buffer][layer]
            out = b_buf.shape[1] // (3 if buffer == "qkv_proj" else 1)
            adapter.views[(layer, module)] = (
                a_buf[slot, index * r : (index + 1) * r, :],
                b_buf[slot, index * out : (index + 1) * out, :r],
            )

    def slot_of(self, lora_id: Optional[str]) -> Optional[int]:
        if lora_id is None:
            return None
        return self._manager.memory_pool.get_buffer_id(lora_id)

    def unload(self, lora_id: str) -> None:
        ref = self._lora_refs.pop(lora_id)
        self.adapters.pop(lora_id)
        self.runtime.caches.versions.bump_adapter(lora_id)
        with compat.no_pinning():
            self.runtime.model_runner.unload_lora_adapter(ref)
