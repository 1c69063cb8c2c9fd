"""What MeZO perturbs: the engine's weights, one engine adapter, or a torch model's parameters.

All three draw z per HF/PEFT name (``engine.directions.fill_direction``), so the same seeds give the
same trajectory on the engine (any tp_size) and on plain transformers.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch

from .. import engine
from ..checkpoint import iter_checkpoint_tensors, locate_checkpoint
from ..engine import NamedSlice, add_scaled_directions, fill_direction, zo_update


def no_decay_names(names: Sequence[str]) -> List[str]:
    """MeZO / HF convention: no weight decay on biases and LayerNorm weights (ModernBERT's are
    ``...norm.weight``: ``attn_norm``, ``mlp_norm``, ``final_norm``, ``head.norm``)."""
    return [n for n in names if n.endswith(("bias", "norm.weight")) or "LayerNorm" in n or "layer_norm" in n]


HALF_PRECISION_FULL_PARAMETER = (
    "full-parameter MeZO on a {dtype} model is refused: {dtype} keeps ~3 significant digits, so most of "
    "the eps*z perturbation (eps=1e-3) and of each update is rounded away and the projected gradient is "
    "noise. Load the model with dtype=torch.float32 for full-parameter MeZO, or train a LoRA adapter "
    "(MeZO keeps float32 master copies of its matrices)."
)


class EngineWeightsTarget:
    """Full-parameter MeZO on an engine model: its own weights perturbed in place, every rank.
    float32 only (see :data:`HALF_PRECISION_FULL_PARAMETER`)."""

    def __init__(self, model, include: Optional[Callable[[str], bool]] = None):
        if model.dtype != torch.float32:
            raise ValueError(HALF_PRECISION_FULL_PARAMETER.format(dtype=str(model.dtype).replace("torch.", "")))
        self.model = model
        names = sorted(engine.hf_parameter_slices(model.runtime.model))
        self.names = [n for n in names if include is None or include(n)]

    def perturb(self, seed: int, scale: float) -> None:
        self.model.runtime.collective_rpc(engine.rank_perturb_weights, self.names, seed, scale)

    def update(self, seed, lr, projected_grad, weight_decay, restore: float = 0.0) -> None:
        self.model.runtime.collective_rpc(engine.rank_update_weights, self.names, seed, lr, projected_grad,
                                          weight_decay, no_decay_names(self.names), restore)

    def load_checkpoint(self, directory: str) -> None:
        wanted = set(self.names)
        tensors = {n: t for n, t in iter_checkpoint_tensors(locate_checkpoint(directory)) if n in wanted}
        self.model.runtime.collective_rpc(engine.rank_set_hf_tensors, tensors)


class EngineAdapterTarget:
    """LoRA MeZO: only one adapter's A/B matrices (PEFT names), in the engine's LoRA pool.

    On a float32 model the pool is perturbed and updated in place. On a half-precision model the
    trained values live in float32 *master copies* here (LoRA is small): the engine's matrices
    are always ``half(master + offset * z)``, so a perturbation is rounded once instead of being
    lost against the weight, restoring is exact, and updates accumulate in float32."""

    def __init__(self, model, adapter_name: str):
        from ..lora.names import engine_key_to_peft

        self.model, self.adapter_name = model, adapter_name
        loaded = model.adapter_info(adapter_name)
        self.lora_id = loaded.lora_id
        prefix = model._head_names().hf_prefix
        self.peft_names = {(l, m, w): engine_key_to_peft(l, m, w, prefix, model.config)
                           for (l, m) in loaded.spec.targets for w in "AB"}
        # The adapter's own task head (modules_to_save) is trained with it, as PEFT trains it.
        self.peft_names.update({("head", e): f"base_model.model.{hf}" for hf, e in model._head_rows(loaded.spec)})
        self.names = sorted(self.peft_names.values())
        self.no_decay = [n for n in self.names if n.endswith(".bias")]  # the head's biases, as Trainer
        self.master: Optional[Dict[str, torch.Tensor]] = None
        if model.dtype != torch.float32:
            self.master = {n: t.float().clone() for n, t in model.adapter_state_dict(adapter_name).items()}
        self._offsets: Dict[str, tuple] = {}  # lora_id -> (seed, accumulated scale), master mode

    # ---- float32 master copies (half-precision models) ------------------------------------------
    def _z(self, seed: int) -> Dict[str, torch.Tensor]:
        return {n: fill_direction(torch.empty(t.shape), seed, n) for n, t in self.master.items()}

    def _write(self, lora_id: str, seed: int, offset: float) -> None:
        state = dict(self.master)
        if offset:
            state = {n: t + offset * z for (n, t), z in zip(self.master.items(), self._z(seed).values())}
        self.model.runtime.collective_rpc(engine.rank_set_adapter_tensors, lora_id, self.peft_names, state)
        self._offsets[lora_id] = (seed, offset)

    # ---- the operations MeZOTrainer calls ------------------------------------------------------------
    def perturb(self, seed: int, scale: float, lora_id: Optional[str] = None) -> None:
        lora_id = lora_id or self.lora_id
        if self.master is None:
            self.model.runtime.collective_rpc(engine.rank_perturb_adapter, lora_id, self.peft_names,
                                              self.names, seed, scale)
            return
        # A scratch adapter (paired batches) was just copied from the trained one: offset 0.
        previous_seed, offset = self._offsets.get(lora_id, (seed, 0.0)) if lora_id == self.lora_id else (seed, 0.0)
        if previous_seed != seed and offset:
            raise RuntimeError("internal error: a new MeZO direction before the previous one was restored")
        self._write(lora_id, seed, offset + scale)

    def update(self, seed, lr, projected_grad, weight_decay, restore: float = 0.0) -> None:
        if self.master is None:
            self.model.runtime.collective_rpc(engine.rank_update_adapter, self.lora_id, self.peft_names, self.names,
                                              seed, lr, projected_grad, weight_decay, self.no_decay, restore)
            return
        with torch.no_grad():
            for (name, t), z in zip(self.master.items(), self._z(seed).values()):
                decay = 0.0 if name in self.no_decay else weight_decay
                t.sub_(lr * (projected_grad * z + decay * t) if decay else lr * projected_grad * z)
        self._write(self.lora_id, seed, 0.0)  # the perturbation, if any, ends here: exact restore

    def copy_into(self, other_adapter_name: str) -> str:
        other = self.model.adapter_info(other_adapter_name).lora_id
        self.model.runtime.collective_rpc(engine.rank_copy_adapter, self.lora_id, other)
        return other

    def load_checkpoint(self, directory: str) -> None:
        from ..lora.files import read_adapter_dir

        _, state = read_adapter_dir(directory)
        if self.master is not None:
            self.master = {n: state[n].float().clone() for n in self.master}
            self._write(self.lora_id, 0, 0.0)
            return
        self.model.runtime.collective_rpc(engine.rank_set_adapter_tensors, self.lora_id, self.peft_names, state)


class TorchParametersTarget:
    """The same MeZO on a plain torch/transformers model (the HF baseline)."""

    def __init__(self, model: torch.nn.Module, include: Optional[Callable[[str], bool]] = None,
                 rename: Callable[[str], str] = lambda n: n):
        self.model = model
        self.slices: Dict[str, NamedSlice] = {
            rename(n): NamedSlice(rename(n), tuple(p.shape), p.data, tuple(slice(None) for _ in p.shape))
            for n, p in model.named_parameters() if p.numel() and (include is None or include(n))
        }
        self.names = sorted(self.slices)

    def perturb(self, seed: int, scale: float) -> None:
        add_scaled_directions(self.slices, self.names, seed, scale)

    def update(self, seed, lr, projected_grad, weight_decay, restore: float = 0.0) -> None:
        zo_update(self.slices, self.names, seed, lr, projected_grad, weight_decay, no_decay_names(self.names),
                  restore)

    def load_checkpoint(self, directory: str) -> None:
        with torch.no_grad():
            for n, t in iter_checkpoint_tensors(locate_checkpoint(directory)):
                if n in self.slices:
                    self.slices[n].view.copy_(t)
