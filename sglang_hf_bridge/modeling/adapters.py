"""The adapter API users know from transformers' ``PeftAdapterMixin``, run by SGLang's LoRA.

Adapters are never merged into the base weights: each lives in a slot of SGLang's LoRA memory
pool and rows of a batch pick theirs (``adapter_names=[...]``, PEFT's mixed-batch spelling).
``adapter_tensors(name)`` gives PEFT-named views of that slot, so in-place changes are what the
next forward computes with.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import torch

from ..errors import AdapterError, PeftWrappingError, UnsupportedAdapterError
from ..hub import hub_options, resolve_adapter_directory
from ..lora.config import AdapterSpec, resolve_adapter_spec
from ..lora.files import read_adapter_dir, write_adapter_dir
from ..lora.init import init_adapter_weights
from ..lora.names import engine_key_to_peft, peft_key_to_engine
from ..process import deferred_interrupts
from ..sglang_models.weight_map import LORA_TARGETS

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in adapter_names
SCRATCH_PREFIX = "__zo_"  # MeZOTrainer's scratch adapters (freed when train() ends)
_STATE_INIT = threading.Lock()

PEFT_WRAPPING_MESSAGE = (
    "peft.PeftModel / get_peft_model cannot wrap an SGLang-backed model: PEFT injects torch LoRA "
    "layers into modules this model does not have (its layers live in the SGLang engine). Use "
    "model.load_adapter(adapter_dir, adapter_name=...) or model.add_adapter(LoraConfig(...)): the "
    "engine runs the same adapter with the same outputs, and model.save_pretrained(dir) writes "
    "PEFT format back."
)


class _ReadOnlyPeftConfigs(dict):
    """What ``model.peft_config`` returns. PEFT's tuner writes into an existing ``peft_config``
    before injecting layers; that write is where it learns it cannot wrap this model."""

    def __setitem__(self, key, value):
        raise PeftWrappingError(PEFT_WRAPPING_MESSAGE)

    def update(self, *args, **kwargs):
        raise PeftWrappingError(PEFT_WRAPPING_MESSAGE)


@dataclass(frozen=True)
class LoadedAdapter:
    """What the face knows of a loaded adapter (``model.adapter_info(name)``)."""

    name: str
    lora_id: str
    peft_config: object
    spec: AdapterSpec


class SGLangAdapterMixin:
    """Adapter methods of the SGLang-backed models (transformers' PeftAdapterMixin names).

    Thread-safe and transactional: every change holds the model's adapter lock, defers Ctrl-C to
    its end, and either happens whole or is rolled back (engine and adapter table together)."""

    def _adapter_state(self):
        if not hasattr(self, "_bridge_adapters"):
            with _STATE_INIT:
                if not hasattr(self, "_bridge_adapters"):
                    self._bridge_active: Optional[str] = None
                    self._bridge_enabled = True
                    self._bridge_lock = threading.RLock()
                    self._bridge_adapters: Dict[str, LoadedAdapter] = {}
        return self._bridge_adapters

    def _adapter_lock(self) -> threading.RLock:
        self._adapter_state()
        return self._bridge_lock

    # ------------------------------------------------------------------ loading
    def load_adapter(self, peft_model_id=None, adapter_name: Optional[str] = None, *, adapter_state_dict=None,
                     peft_config=None, **kwargs) -> None:
        """Load a PEFT LoRA adapter -- a local directory or a Hub id (``revision=``, ``subfolder=``,
        ``cache_dir=``, ``token=``, ``local_files_only=``, also inside ``adapter_kwargs``) -- or
        ``adapter_state_dict`` + ``peft_config`` onto the engine and make it the active adapter."""
        adapter_name = check_adapter_name(adapter_name)
        self._check_new_name(adapter_name)  # early, before reading files; checked again under the lock
        if adapter_state_dict is not None:
            if peft_config is None:
                raise UnsupportedAdapterError("adapter_state_dict needs peft_config")
            config, state = peft_config, adapter_state_dict
        else:  # a local directory or a Hub id, resolved as PEFT resolves it
            lookup = {**(kwargs.get("adapter_kwargs") or {}), **kwargs}
            directory = resolve_adapter_directory(peft_model_id, subfolder=lookup.get("subfolder"),
                                                  **hub_options(lookup))
            config, state = read_adapter_dir(directory)
        spec = self._resolve_spec(config)
        weights, head = _state_to_engine(state, spec, self._head_names())
        self._register(adapter_name, config, spec, weights, head=head)

    def add_adapter(self, adapter_config, adapter_name: Optional[str] = None) -> None:
        """A fresh adapter initialised as PEFT does (B = 0 unless ``init_lora_weights=False``)."""
        self._add_adapter(adapter_config, check_adapter_name(adapter_name))

    def _add_adapter(self, adapter_config, adapter_name: str, activate: bool = True) -> None:
        """``add_adapter`` without the public name rules: MeZOTrainer's reserved scratch names,
        added without becoming active."""
        self._check_new_name(adapter_name)
        spec = self._resolve_spec(adapter_config)
        weights = init_adapter_weights(spec, adapter_config.init_lora_weights, self.config)
        head = self._base_head_copy(spec)  # PEFT's modules_to_save start as copies of the model's
        self._register(adapter_name, copy.deepcopy(adapter_config), spec, weights, activate, head=head)

    # ------------------------------------------------------------------ adapters' own heads
    def _head_names(self):
        """The weight map of this model's class (its head's names)."""
        from ..sglang_models.weight_map import weight_map_for

        return weight_map_for(self.config, self.head_spec.name)

    def _resolve_spec(self, peft_config) -> AdapterSpec:
        names = self._head_names()
        head_modules = tuple(p[:-1] for p in names.head_prefixes) if self.head_spec.new_when_missing else ()
        return resolve_adapter_spec(peft_config, self.config, self._max_lora_rank(), head_modules,
                                    self.head_spec.name)

    def _head_rows(self, spec: AdapterSpec):
        """``(HF name, engine name)`` of every head tensor the adapter keeps its own copy of."""
        names = self._head_names()
        return [(names.to_hf_name(c), e) for c, e, _ in names.rows if c.split(".")[0] in spec.head_modules]

    def _base_head_copy(self, spec: AdapterSpec) -> Dict[str, torch.Tensor]:
        model = self.runtime.model  # heads are replicated: rank 0 holds them whole
        return {e: model.get_parameter(e).detach().clone() for _, e in self._head_rows(spec)}

    def _adapter_head_tensors(self, adapter: "LoadedAdapter") -> Dict[str, torch.Tensor]:
        """PEFT-saved names (``base_model.model.classifier.dense.weight``) -> rank 0's tensors of the
        adapter's own head (views: in-place changes are used by the next forward on every rank at
        tp_size=1)."""
        engine = self.runtime.adapter(adapter.lora_id)
        return {f"base_model.model.{hf}": engine.head[e] for hf, e in self._head_rows(adapter.spec)}

    def _max_lora_rank(self) -> int:
        lora = self.runtime.config.lora
        if lora is None:
            raise AdapterError("this model was loaded with enable_lora=False: reload it with LoRA enabled")
        return lora.max_rank

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not name or name == BASE_ADAPTER:
            raise ValueError(f"invalid adapter name {name!r}")
        if name in self._adapter_state():
            raise ValueError(f"an adapter named {name!r} is already loaded; delete_adapter it first")
        self._max_lora_rank()

    def _register(self, name, config, spec, weights, activate: bool = True, head=None) -> None:
        done = False
        try:
            with self._adapter_lock(), deferred_interrupts():
                self._check_new_name(name)
                state = self._adapter_state()
                before = (self._bridge_active, self._bridge_enabled)
                engine = self.runtime.load_adapter(name, weights, spec.rank, spec.scaling, head or None)
                try:
                    state[name] = LoadedAdapter(name, engine.lora_id, config, spec)
                    if activate:
                        self._bridge_active, self._bridge_enabled = name, True
                except BaseException:
                    state.pop(name, None)
                    self._bridge_active, self._bridge_enabled = before
                    self.runtime.discard_adapter(engine.lora_id)
                    raise
                done = True
        except KeyboardInterrupt:
            if not done:
                raise
            # Ctrl-C held back until the load was whole: say so, or a retry fails with "already loaded".
            raise KeyboardInterrupt(
                f"interrupted after adapter {name!r} finished loading: it is loaded"
                + (" and active" if activate else "") + f"; model.delete_adapter({name!r}) undoes it") from None

    # ------------------------------------------------------------------ selection
    def set_adapter(self, adapter_name: Union[str, Sequence[str]]) -> None:
        if not isinstance(adapter_name, str):
            names = list(adapter_name)
            if len(names) != 1:
                raise ValueError("the engine runs one active adapter per row; pass one name "
                                 "(mix adapters per row with adapter_names=[...])")
            adapter_name = names[0]
        with self._adapter_lock():
            if adapter_name not in self._adapter_state():
                raise ValueError(f"no adapter named {adapter_name!r}; loaded: {sorted(self._adapter_state())}")
            self._bridge_active = adapter_name

    def disable_adapters(self) -> None:
        self._adapter_state()
        self._bridge_enabled = False

    def enable_adapters(self) -> None:
        self._adapter_state()
        self._bridge_enabled = True

    def active_adapters(self) -> List[str]:
        self._adapter_state()
        if not self._bridge_enabled or self._bridge_active is None:
            return []
        return [self._bridge_active]

    def active_adapter(self) -> Optional[str]:
        active = self.active_adapters()
        return active[0] if active else None

    def delete_adapter(self, adapter_names: Union[str, Sequence[str]]) -> None:
        """Unload adapters. Once an unload has begun it is completed (rolled forward) even when
        interrupted, so the engine and the adapter table never disagree."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        done = False
        try:
            with self._adapter_lock(), deferred_interrupts():
                state = self._adapter_state()
                for name in names:
                    if name not in state:
                        raise ValueError(f"no adapter named {name!r}; loaded: {sorted(state)}")
                for name in names:
                    lora_id = state[name].lora_id
                    try:
                        self.runtime.unload_adapter(lora_id)
                    finally:
                        state.pop(name, None)
                        if self._bridge_active == name:
                            self._bridge_active = next(iter(state), None)
                        self.runtime.discard_adapter(lora_id)  # a no-op after a complete unload
                done = True
        except KeyboardInterrupt:
            if not done:
                raise
            raise KeyboardInterrupt(
                f"interrupted after deleting adapter(s) {names}: the delete completed, they are no longer "
                "loaded") from None

    @property
    def peft_config(self) -> Dict[str, object]:
        """Loaded adapters' PEFT configs by name (read-only)."""
        return _ReadOnlyPeftConfigs({n: a.peft_config for n, a in self._adapter_state().items()})

    # ------------------------------------------------------------------ tensors and saving
    def adapter_tensors(self, adapter_name: Optional[str] = None) -> Dict[str, torch.Tensor]:
        """PEFT-named ``lora_A``/``lora_B`` tensors of an adapter (the names PEFT's
        ``save_pretrained`` writes), as views of the engine's LoRA pool: in-place changes are
        used by the next forward, with no copy and no reload. ModernBERT's fused ``Wqkv`` / ``Wi``
        matrices are copies (SGLang holds one A per fused part; one view cannot change them all)."""
        adapter = self._get_adapter(adapter_name)
        if self.runtime.config.tp_size > 1:
            raise NotImplementedError(
                "adapter_tensors() hands out views of one engine's memory; under tp_size > 1 each rank "
                "holds a shard. Use adapter_state_dict() for full copies."
            )
        engine = self.runtime.adapter(adapter.lora_id)
        prefix = self._head_names().hf_prefix
        out = {}
        for (layer, module) in sorted(adapter.spec.targets):
            a, b = engine.matrices((layer, module))
            if LORA_TARGETS[module].fused:  # SGLang keeps a copy of A per part: hand out copies
                a, b = a.clone(), b.clone()
            out[engine_key_to_peft(layer, module, "A", prefix, self.config)] = a
            out[engine_key_to_peft(layer, module, "B", prefix, self.config)] = b
        out.update(self._adapter_head_tensors(adapter))
        return out

    def adapter_state_dict(self, adapter_name: Optional[str] = None) -> Dict[str, torch.Tensor]:
        """Full PEFT-named copies of an adapter's matrices (gathered across TP ranks)."""
        adapter = self._get_adapter(adapter_name)
        matrices = self.runtime.adapter_matrices(adapter.lora_id)
        prefix = self._head_names().hf_prefix
        out = {}
        for (layer, module) in sorted(adapter.spec.targets):
            for i, which in enumerate("AB"):
                out[engine_key_to_peft(layer, module, which, prefix, self.config)] = matrices[(layer, module)][i]
        out.update({k: v.detach().cpu().clone() for k, v in self._adapter_head_tensors(adapter).items()})
        return out

    def save_adapter(self, save_directory, adapter_name: Optional[str] = None) -> None:
        """Write one adapter in PEFT format; ``peft.PeftModel.from_pretrained(hf_model, dir)``
        loads it back on plain transformers. Atomic: the directory holds the old adapter or the
        new one, whole, even if this process is killed mid-save; its other files are kept."""
        write_adapter_dir(save_directory, *self._adapter_for_saving(adapter_name))

    def _adapter_for_saving(self, adapter_name: Optional[str] = None):
        """``(PEFT config, PEFT-named state dict)`` as ``save_adapter`` writes them."""
        adapter = self._get_adapter(adapter_name)
        config = copy.deepcopy(adapter.peft_config)
        config.base_model_name_or_path = getattr(self, "name_or_path", None)
        config.inference_mode = True
        return config, self.adapter_state_dict(adapter.name)

    def adapter_info(self, adapter_name: Optional[str] = None) -> LoadedAdapter:
        """Name, engine id, PEFT config and resolved targets of a loaded adapter (default: the
        active one)."""
        return self._get_adapter(adapter_name)

    def _get_adapter(self, adapter_name: Optional[str]) -> LoadedAdapter:
        state = self._adapter_state()
        name = adapter_name or self._bridge_active
        entry = state.get(name) if name is not None else None
        if entry is None:
            raise ValueError(f"no adapter named {name!r}; loaded: {sorted(state)}")
        return entry

    # ------------------------------------------------------------------ per-row selection
    def _row_lora_ids(self, batch_size: int, adapter_names) -> List[Optional[str]]:
        state = self._adapter_state()
        if adapter_names is None:
            active = self.active_adapters()
            lora_id = state[active[0]].lora_id if active else None
            return [lora_id] * batch_size
        names = list(adapter_names)
        if len(names) != batch_size:
            raise ValueError(f"adapter_names has {len(names)} entries for a batch of {batch_size} rows")
        ids = []
        for name in names:
            entry = state.get(name)
            if name == BASE_ADAPTER:
                ids.append(None)
            elif entry is not None:
                ids.append(entry.lora_id)
            else:
                raise ValueError(f"adapter_names: no adapter named {name!r}; loaded: {sorted(state)} "
                                 f"(use {BASE_ADAPTER!r} for the base model)")
        return ids


def check_adapter_name(name) -> str:
    """A name for a new adapter (None: PEFT's ``"default"``). Names end up in paths and logs and
    share a table with reserved ones, so refuse what would be silently renamed or collide."""
    if name is None:
        return "default"
    rule = None
    if not isinstance(name, str):
        rule = f"must be a string, got {type(name).__name__}"
    elif not name:
        rule = "must not be empty (pass None for 'default')"
    elif "/" in name or "\\" in name or ".." in name:
        rule = "must not contain a path separator ('/', '\\') or '..'"
    elif name != name.strip():
        rule = "must not start or end with whitespace"
    elif name == BASE_ADAPTER:
        rule = f"{BASE_ADAPTER!r} is reserved for the base model in adapter_names"
    elif name.startswith(SCRATCH_PREFIX):
        rule = f"names starting with {SCRATCH_PREFIX!r} are reserved for MeZOTrainer's scratch adapters"
    if rule is not None:
        raise AdapterError(f"invalid adapter name {name!r}: {rule}")
    return name


def _state_to_engine(state: Dict[str, torch.Tensor], spec: AdapterSpec, names):
    """PEFT state dict -> (engine ``{(layer, module): (A, B)}``, the adapter's own head as engine
    names -> tensors); every tensor must be used, and a head named in modules_to_save be whole."""
    pairs: Dict[tuple, Dict[str, torch.Tensor]] = {}
    unknown, head = [], {}
    wanted = {names.to_hf_name(c): e for c, e, _ in names.rows if c.split(".")[0] in spec.head_modules}
    for key, tensor in state.items():
        bare = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
        if bare in wanted:
            head[wanted[bare]] = tensor
            continue
        try:
            layer, module, which = peft_key_to_engine(key, names)
        except KeyError:
            unknown.append(key)
            continue
        pairs.setdefault((layer, module), {})[which] = tensor
    if unknown:
        raise UnsupportedAdapterError(
            f"adapter tensors the engine cannot place: {', '.join(sorted(unknown)[:5])}"
            + (" ..." if len(unknown) > 5 else "")
        )
    lacking = sorted(hf for hf, e in wanted.items() if e not in head)
    if lacking:
        raise UnsupportedAdapterError(f"the adapter's config saves {', '.join(spec.head_modules)} (modules_to_save) "
                                      f"but its files lack {', '.join(lacking)}")
    weights = {}
    for key, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise UnsupportedAdapterError(f"layer {key[0]} {key[1]}: needs both lora_A and lora_B")
        if key not in spec.targets:
            raise UnsupportedAdapterError(
                f"adapter has weights for layer {key[0]} {key[1]}, which its config does not target")
        weights[key] = (ab["A"], ab["B"])
    missing = sorted(spec.targets - set(weights))
    if missing:
        raise UnsupportedAdapterError(f"adapter config targets {missing[:4]} but the weights are missing")
    return weights, head
