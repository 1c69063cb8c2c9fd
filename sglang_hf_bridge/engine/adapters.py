"""LoRA adapters on one rank's engine: load into SGLang's LoRA manager, keep them resident in its
memory pool, hand out views of their A/B matrices, unload.

Engine-side keys are ``(layer, module)`` with module one of ``q_proj k_proj v_proj o_proj
fc_in down_proj``; PEFT names live in the face (``sglang_hf_bridge.lora``). Weight versions are
the front's business (:class:`~sglang_hf_bridge.engine.runtime.EncoderRuntime`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Mapping, Optional, Tuple

import torch

from .. import compat
from ..errors import AdapterError, AdapterRankError
from ..sglang_models.layout import lora_layout, module_dims
from ..sglang_models.weight_map import ALL_PARTS, FUSED_QKV_TARGETS, LORA_TARGETS

AdapterKey = Tuple[int, str]  # (layer, engine module)
AdapterWeights = Mapping[AdapterKey, Tuple[torch.Tensor, torch.Tensor]]  # (A [r, in], B [out, r])
# An adapter's own task head (PEFT's modules_to_save): engine parameter name -> tensor, whole on
# every rank (heads are replicated).
AdapterHead = Mapping[str, torch.Tensor]
HEAD_PARAMETER_PREFIXES = ("head.", "pooler.")


@dataclass
class EngineAdapter:
    """An adapter resident in the pool. ``keys`` includes the zero q/k/v slices SGLang needs."""

    lora_id: str
    name: str
    rank: int
    scaling: float
    keys: FrozenSet[AdapterKey]
    # This rank's views of the real (unpadded) part of each A / B in its pool slot; where each
    # sits in the full matrix is its layout's (``layout.lora_layout``).
    views: Dict[AdapterKey, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # The adapter's own head tensors (engine names), used for its rows instead of the model's head.
    head: Dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def layers(self) -> FrozenSet[int]:
        return frozenset(layer for layer, _ in self.keys)

    def matrices(self, key: AdapterKey) -> Tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``(A, B)`` of one target as PEFT shapes them (views where possible): a fused
        target's A is its first part's copy, its B the parts' real rows stacked (a copy when SGLang
        pads between them)."""
        a, b = self.views[key]
        if not LORA_TARGETS[key[1]].fused:
            return a, b
        return a[0], b.reshape(-1, b.shape[-1])


def validate_adapter(config, weights: AdapterWeights, rank: int) -> None:
    """Shapes must fit ``rank`` and this model's projections; layers must exist."""
    for (layer, module), (a, b) in weights.items():
        if not 0 <= layer < config.num_hidden_layers:
            raise AdapterError(f"adapter has weights for layer {layer}; the model has {config.num_hidden_layers}")
        fan_in, fan_out = module_dims(config, module)
        if tuple(a.shape) != (rank, fan_in) or tuple(b.shape) != (fan_out, rank):
            raise AdapterError(
                f"layer {layer} {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                f"rank {rank} and this model's ({fan_in} -> {fan_out}) projection"
            )


def with_full_qkv(config, weights: AdapterWeights, rank: int) -> Dict[AdapterKey, Tuple[torch.Tensor, torch.Tensor]]:
    """SGLang stacks q/k/v and assumes all three are present: a new dict with zero slices added
    where a layer targets some of q/k/v (the caller's dict is left alone)."""
    out = dict(weights)
    for layer in {layer for layer, m in weights if m in FUSED_QKV_TARGETS}:
        for m in FUSED_QKV_TARGETS:
            if (layer, m) not in out:
                fan_in, fan_out = module_dims(config, m)
                out[(layer, m)] = (torch.zeros(rank, fan_in), torch.zeros(fan_out, rank))
    return out


def sglang_adapter_tensors(weights: AdapterWeights, layouts) -> Dict[str, torch.Tensor]:
    """The names SGLang's LoRA loader expects for our model's modules, each matrix padded as its
    layout says SGLang's loader wants it (the CPU FFN)."""
    tensors = {}
    for (layer, module), (a, b) in weights.items():
        prefix = f"base_model.model.layers.{layer}.{LORA_TARGETS[module].parent}.{module}"
        for which, matrix in (("A", a), ("B", b)):
            matrix = lora_layout(layouts, layer, module, which).padded_for_loading(matrix)
            tensors[f"{prefix}.lora_{which}.weight"] = matrix.detach().to(torch.float32).contiguous()
    return tensors


class AdapterPool:
    """Adapters resident in one rank's LoRA memory pool."""

    def __init__(self, engine):
        self.engine = engine  # the RankEngine
        self.adapters: Dict[str, EngineAdapter] = {}  # by lora_id
        self._lora_refs = {}

    @property
    def _manager(self):
        manager = compat.lora_manager(self.engine.runner)
        if manager is None:
            raise AdapterError("this model was loaded with enable_lora=False: reload it with LoRA enabled")
        return manager

    def check_room(self, rank: int) -> None:
        limits = self.engine.config.lora
        self._manager  # noqa: B018 - raises when LoRA is off
        if len(self.adapters) >= limits.max_adapters:
            raise AdapterError(f"the engine holds at most {limits.max_adapters} adapters (max_loras); delete one first")
        if rank > limits.max_rank:
            raise AdapterRankError(f"adapter rank {rank} is above the engine's max_lora_rank={limits.max_rank}")

    def own_head(self, head: Optional[AdapterHead]) -> Dict[str, torch.Tensor]:
        """This rank's copy of an adapter's head, checked against the model's head parameters."""
        if not head:
            return {}
        params = dict(self.engine.model.named_parameters())
        out = {}
        for name, tensor in head.items():
            if not name.startswith(HEAD_PARAMETER_PREFIXES) or name not in params:
                raise AdapterError(f"adapter head tensor {name!r} is not a parameter of this model's head")
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise AdapterError(f"adapter head tensor {name!r} has shape {tuple(tensor.shape)}, the model's head "
                                   f"has {tuple(params[name].shape)}")
            out[name] = tensor.detach().to(params[name].device, params[name].dtype).clone()
        return out

    def load(self, name: str, weights: AdapterWeights, rank: int, scaling: float, lora_id: str,
             head: Optional[AdapterHead] = None) -> EngineAdapter:
        from sglang.srt.lora.lora_registry import LoRARef

        self.check_room(rank)
        config = self.engine.model.config
        validate_adapter(config, weights, rank)
        own_head = self.own_head(head)
        full = with_full_qkv(config, weights, rank)
        ref = LoRARef(lora_name=name, lora_path=f"sglang-hf-bridge://{name}", pinned=False, lora_id=lora_id)
        # SGLang scales by lora_alpha / r; pass the alpha that yields the wanted scaling.
        config_dict = {"peft_type": "LORA", "r": rank, "lora_alpha": scaling * rank,
                       "target_modules": sorted({m for _, m in full})}
        self._lora_refs[lora_id] = ref  # first: whatever happens next, discard() can undo it
        try:
            with compat.no_pinning():
                tensors = sglang_adapter_tensors(full, self.engine.model.layouts)
                result = self.engine.runner.load_lora_adapter_from_tensors(ref, tensors, config_dict)
            error = compat.lora_update_error(result)
            if error is not None:
                raise AdapterError(f"SGLang refused adapter {name!r}: {error}")
            adapter = EngineAdapter(lora_id, name, rank, scaling, frozenset(full), head=own_head)
            self.adapters[lora_id] = adapter
            self._make_resident(adapter)
        except BaseException:
            self.discard(lora_id)
            raise
        return adapter

    def _make_resident(self, adapter: EngineAdapter) -> None:
        """Bring the adapter into the pool now (a one-token pass) and take views of its slot."""
        from .types import EncoderCall, EncoderSequence, Logits

        self.engine.forward(EncoderCall(
            sequences=[EncoderSequence(input_ids=[0], position_ids=[self.engine.model.config.pad_token_id + 1],
                                       lora_id=adapter.lora_id)],
            logits=Logits.NONE,
        ))
        A_buffer, B_buffer = compat.lora_pool_buffers(self._manager)
        slot = self.slot_of(adapter.lora_id)
        r = adapter.rank
        layouts, rank = self.engine.model.layouts, self.engine.rank
        for layer, module in adapter.keys:
            target = LORA_TARGETS[module]
            a_buf, b_buf = A_buffer[target.base][layer], B_buffer[target.base][layer]
            if target.fused:  # every part's copy of the shared A as [parts, r, in]; B as [parts, rows, r]
                parts = len(layouts[target.engine_weight(layer)].parts)
                a = a_buf[slot, : parts * r, :].unflatten(0, (parts, r))
                b = b_buf[slot, :, :r]
                adapter.views[(layer, module)] = (a, lora_layout(layouts, layer, module, "B").local(b, rank, ALL_PARTS))
                continue
            index = target.slice_index
            out = b_buf.shape[1] // (len(FUSED_QKV_TARGETS) if target.part else 1)
            a = a_buf[slot, index * r : (index + 1) * r, :]
            b = b_buf[slot, index * out : (index + 1) * out, :r]
            adapter.views[(layer, module)] = (lora_layout(layouts, layer, module, "A").local(a, rank),
                                              lora_layout(layouts, layer, module, "B").local(b, rank))

    def slot_of(self, lora_id: Optional[str]) -> Optional[int]:
        if lora_id is None:
            return None
        return compat.lora_pool_slot(self._manager, lora_id)

    def unload(self, lora_id: str) -> None:
        ref = self._lora_refs[lora_id]
        with compat.no_pinning():
            result = self.engine.runner.unload_lora_adapter(ref)
        error = compat.lora_update_error(result)
        if error is not None:
            raise AdapterError(f"SGLang could not unload adapter {ref.lora_name!r}: {error}")
        del self._lora_refs[lora_id]
        self.adapters.pop(lora_id, None)

    def discard(self, lora_id: str) -> None:
        """Forget ``lora_id`` here and in SGLang, whatever state a failed load left it in."""
        ref = self._lora_refs.pop(lora_id, None)
        self.adapters.pop(lora_id, None)
        if ref is not None:  # SGLang's unload drops whatever part of the adapter it registered
            with compat.no_pinning():
                self.engine.runner.unload_lora_adapter(ref)

    def buffer_version(self) -> int:
        """Sum of the pool buffers' in-place version counters (moves on any in-place edit)."""
        manager = compat.lora_manager(self.engine.runner)
        if manager is None:
            return 0
        total = 0
        for buffers in compat.lora_pool_buffers(manager):
            total += sum(compat.tensor_version(t) for per_layer in buffers.values() for t in per_layer)
        # adapters' own heads (in-place edits through adapter_tensors() views count too)
        total += sum(compat.tensor_version(t) for a in self.adapters.values() for t in a.head.values())
        return total

    def heads_of(self, lora_ids) -> Optional[list]:
        """Per row: the adapter's own head tensors, or None (the model's head); None when no row's
        adapter has a head of its own."""
        heads = [self.adapters[i].head if i is not None and i in self.adapters else None for i in lora_ids]
        return heads if any(heads) else None
