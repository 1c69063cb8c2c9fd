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


def assemble_method_state(per_rank) -> Dict[str, Dict[str, torch.Tensor]]:
    """Every rank's share of a method's state (``rank_method_state``) -> full tensors per name
    (as the trained tensors are shaped: a fused one as ``[parts, rows, ...]``), scalars once."""
    out: Dict[str, Dict[str, torch.Tensor]] = {}
    for shares in per_rank:
        for name, keys in shares.items():
            for key, (tensor, index, full_shape) in keys.items():
                if index is None:
                    out.setdefault(name, {})[key] = tensor
                    continue
                if tensor.dim() > len(full_shape):  # a fused LoRA A's copies (one per part): equal
                    tensor = tensor[0]
                full = out.setdefault(name, {}).get(key)
                if full is None:
                    full = out[name][key] = torch.zeros(full_shape, dtype=tensor.dtype)
                full[index] = tensor
    return out


def _local_store_state(store) -> Dict[str, Dict[str, torch.Tensor]]:
    return {n: {k: t.detach().cpu().clone() for k, t in st.items()} for n, st in store.items()}


def _set_local_store(store, slices, full) -> None:
    store.clear()
    for name, state in full.items():
        view = slices[name].view
        store[name] = {k: t.to(view.device, view.dtype if t.is_floating_point() and t.dim() else t.dtype).clone()
                       for k, t in state.items()}


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

    def perturb(self, seed: int, scale: float, method=None) -> None:
        if method is None:
            self.model.runtime.collective_rpc(engine.rank_perturb_weights, self.names, seed, scale)
        else:
            self.model.runtime.collective_rpc(engine.rank_method_perturb, "base", None, None, self.names, seed,
                                              scale, method)

    def update(self, seed, lr, projected_grad, weight_decay, restore: float = 0.0) -> None:
        self.model.runtime.collective_rpc(engine.rank_update_weights, self.names, seed, lr, projected_grad,
                                          weight_decay, no_decay_names(self.names), restore)

    # ---- any other zeroth-order method: its state stays on the ranks ------------------------------
    def prepare(self, method) -> None:
        self.model.runtime.collective_rpc(engine.rank_method_prepare, "base", None, None, self.names, method)

    def method_update(self, samples, lr, weight_decay, method, restore=None) -> None:
        self.model.runtime.collective_rpc(engine.rank_method_update, "base", None, None, self.names, samples, lr,
                                          weight_decay, no_decay_names(self.names), method, restore)

    def method_state(self, method):
        return assemble_method_state(self.model.runtime.collective_rpc(engine.rank_method_state, "base", None, None,
                                                                       method.whole_state))

    def set_method_state(self, full, method) -> None:
        self.model.runtime.collective_rpc(engine.rank_set_method_state, "base", None, None, full, method.whole_state)

    def full_tensors(self) -> Dict[str, torch.Tensor]:
        wanted = set(self.names)
        return {n: t for n, t in self.model.state_dict().items() if n in wanted}

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
        method = getattr(self, "_method", None)
        draw = fill_direction if method is None else method.draw
        z = {n: draw(torch.empty(t.shape), seed, n) for n, t in self.master.items()}
        if method is not None:
            z = {n: method.direction(n, d, self._store[n]) for n, d in z.items()}
        return z

    def _master_slices(self) -> Dict[str, NamedSlice]:
        return {n: NamedSlice(n, tuple(t.shape), t, (slice(None),) * t.dim()) for n, t in self.master.items()}

    # ---- any other zeroth-order method: state on the ranks (float32 pool) or here (master copies) --
    @property
    def _store(self) -> Dict[str, dict]:
        return self.__dict__.setdefault("_method_store", {})

    def prepare(self, method) -> None:
        if self.master is None:
            self.model.runtime.collective_rpc(engine.rank_method_prepare, self.lora_id, self.lora_id,
                                              self.peft_names, self.names, method)
        else:
            engine.method_prepare(self._master_slices(), self.names, method, self._store)

    def method_update(self, samples, lr, weight_decay, method, restore=None) -> None:
        if self.master is None:
            self.model.runtime.collective_rpc(engine.rank_method_update, self.lora_id, self.lora_id, self.peft_names,
                                              self.names, samples, lr, weight_decay, self.no_decay, method, restore)
            return
        engine.method_update(self._master_slices(), self.names, samples, lr, weight_decay, self.no_decay, method,
                             self._store)  # the master copies were never perturbed: nothing to restore
        self._method = method
        self._write(self.lora_id, samples[-1][0], 0.0)

    def method_state(self, method):
        if self.master is not None:
            return _local_store_state(self._store)
        return assemble_method_state(self.model.runtime.collective_rpc(
            engine.rank_method_state, self.lora_id, self.lora_id, self.peft_names, method.whole_state))

    def set_method_state(self, full, method) -> None:
        if self.master is not None:
            _set_local_store(self._store, self._master_slices(), full)
        else:
            self.model.runtime.collective_rpc(engine.rank_set_method_state, self.lora_id, self.lora_id,
                                              self.peft_names, full, method.whole_state)

    def full_tensors(self) -> Dict[str, torch.Tensor]:
        return dict(self.master) if self.master is not None else self.model.adapter_state_dict(self.adapter_name)

    def _write(self, lora_id: str, seed: int, offset: float) -> None:
        state = dict(self.master)
        if offset:
            state = {n: t + offset * z for (n, t), z in zip(self.master.items(), self._z(seed).values())}
        self.model.runtime.collective_rpc(engine.rank_set_adapter_tensors, lora_id, self.peft_names, state)
        self._offsets[lora_id] = (seed, offset)

    # ---- the operations MeZOTrainer calls ------------------------------------------------------------
    def perturb(self, seed: int, scale: float, lora_id: Optional[str] = None, method=None) -> None:
        lora_id = lora_id or self.lora_id
        if self.master is None:
            if method is None:
                self.model.runtime.collective_rpc(engine.rank_perturb_adapter, lora_id, self.peft_names,
                                                  self.names, seed, scale)
            else:  # the trained adapter's state (its mask...) directs its scratch copies too
                self.model.runtime.collective_rpc(engine.rank_method_perturb, self.lora_id, lora_id, self.peft_names,
                                                  self.names, seed, scale, method)
            return
        self._method = method
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

    def perturb(self, seed: int, scale: float, method=None) -> None:
        if method is None:
            add_scaled_directions(self.slices, self.names, seed, scale)
        else:
            engine.method_perturb(self.slices, self.names, seed, scale, method, self._store)

    def update(self, seed, lr, projected_grad, weight_decay, restore: float = 0.0) -> None:
        zo_update(self.slices, self.names, seed, lr, projected_grad, weight_decay, no_decay_names(self.names),
                  restore)

    # ---- any other zeroth-order method ---------------------------------------------------------------
    @property
    def _store(self) -> Dict[str, dict]:
        return self.__dict__.setdefault("_method_store", {})

    def prepare(self, method) -> None:
        engine.method_prepare(self.slices, self.names, method, self._store)

    def method_update(self, samples, lr, weight_decay, method, restore=None) -> None:
        engine.method_update(self.slices, self.names, samples, lr, weight_decay, no_decay_names(self.names), method,
                             self._store, restore)

    def method_state(self, method):
        return _local_store_state(self._store)

    def set_method_state(self, full, method) -> None:
        _set_local_store(self._store, self.slices, full)

    def full_tensors(self) -> Dict[str, torch.Tensor]:
        return {n: s.view for n, s in self.slices.items()}

    def load_checkpoint(self, directory: str) -> None:
        with torch.no_grad():
            for n, t in iter_checkpoint_tensors(locate_checkpoint(directory)):
                if n in self.slices:
                    self.slices[n].view.copy_(t)
