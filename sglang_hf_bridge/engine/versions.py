"""Weight versions: what every cache key includes, so a changed weight never serves a stale result.

One logical clock; each weight *component* remembers the clock value of its last change:
``("base", layer)`` for the embeddings (layer -1), each encoder layer and the LM head
(layer ``HEAD``), and ``("lora", lora_id)`` for each adapter. The version of a set of components
is the largest of their stamps, so any change to any of them raises it, and a change elsewhere
(an adapter, the top layers) leaves it alone -- what the frozen-layer cache relies on.

Who bumps (every path that writes engine weights or adapter matrices):

* ``EncoderRuntime.start`` -- all base components;
* ``EncoderRuntime.collective_rpc(op)`` -- what ``op`` declares with :func:`writes` (HF names ->
  layers, an adapter id: adapter load/unload, MeZO's in-place operations, checkpoint resume);
* in-place edits through the views ``adapter_tensors()`` hands out: those views share PyTorch's
  version counter with SGLang's LoRA pool buffers, and :meth:`WeightVersions.adapter_version`
  folds those counters in, so even a user's ``view.add_(...)`` changes the version.

Choosing the active adapter (``set_adapter``, ``disable_adapters``) changes no weight; it
changes which adapter each row names, and the adapter id is part of every key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Tuple, Union

from ..sglang_models.weight_map import TOP_LEVEL_PREFIXES

EMBEDDINGS = -1
HEAD = 1 << 20  # sorts after every encoder layer

_LAYER = re.compile(r"(?:^|\.)(?:encoder\.layer|layers)\.(\d+)\.")
_POOLER = re.compile(r"(?:^|\.)pooler\.")
_FINAL_NORM = re.compile(r"(?:^|\.)final_norm\.")


def base_layer_of(hf_name: str) -> int:
    """The base component an HF parameter name belongs to (embeddings, layer i, or head)."""
    m = _LAYER.search(hf_name)
    if m:
        return int(m.group(1))
    if hf_name.startswith(TOP_LEVEL_PREFIXES) or _POOLER.search(hf_name) or _FINAL_NORM.search(hf_name):
        return HEAD  # every head of every family; ModernBERT's final norm comes after every layer
    return EMBEDDINGS  # embeddings (the tied decoder is the word-embedding matrix)


def engine_layer_of(engine_name: str) -> int:
    """The base component an engine parameter belongs to (``layers.N.`` / ``embeddings.`` / head)."""
    m = _LAYER.search(engine_name)
    if m:
        return int(m.group(1))
    return EMBEDDINGS if engine_name.startswith("embeddings.") else HEAD


def min_layer_of(names: Iterable[str]) -> Optional[int]:
    layers = [base_layer_of(n) for n in names]
    return min(layers) if layers else None


class WeightVersions:
    def __init__(self) -> None:
        self._clock = 0
        self._base: Dict[int, int] = {}
        self._lora: Dict[str, int] = {}
        self._all_base = 0  # stamp of the last "every base component" bump
        self._all_lora = 0  # stamp of the last "every adapter" bump

    @property
    def clock(self) -> int:
        return self._clock

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def bump_base(self, layers: Optional[Iterable[int]] = None) -> None:
        """Base components changed (None: all of them)."""
        t = self._tick()
        if layers is None:
            self._all_base = t
            self._base.clear()
        else:
            for layer in layers:
                self._base[layer] = t

    def bump_adapter(self, lora_id: str) -> None:
        self._lora[lora_id] = self._tick()

    def bump_everything(self) -> None:
        self.bump_base(None)
        self._all_lora = self._clock

    def base_version(self, below: Optional[int] = None) -> int:
        """Version of the base components in layers < ``below`` (embeddings included), or all."""
        stamps = [t for layer, t in self._base.items() if below is None or layer < below]
        return max([self._all_base, *stamps])

    def adapter_version(self, lora_id: str, counters: int) -> Tuple[int, int]:
        """(last explicit bump, ``counters``: the sum of the adapter's views' in-place version
        counters, which the caller reads)."""
        explicit = max(self._lora.get(lora_id, 0), self._all_lora)
        return explicit, counters


# ---- what lockstep operations write ------------------------------------------------------------
@dataclass(frozen=True)
class BaseWrite:
    """An operation writes base weights: these HF names (None: every base component)."""

    hf_names: Optional[Iterable[str]]


@dataclass(frozen=True)
class AdapterWrite:
    """An operation writes one adapter's matrices."""

    lora_id: str


WriteEffect = Callable[..., Union[BaseWrite, AdapterWrite]]


def writes(effect: Optional[WriteEffect]):
    """Declare a rank operation (``fn(engine, *args)``, run on every rank by ``collective_rpc``)
    and what it writes: ``effect(*args)`` gives a :class:`BaseWrite` or an :class:`AdapterWrite`;
    ``None`` = writes nothing. Workers run only functions declared this way."""

    def mark(fn):
        fn.weight_effect = effect
        fn.declares_effect = True
        return fn

    return mark


def apply_effect(versions: WeightVersions, fn, args: tuple) -> None:
    """Move the versions by what ``fn`` declares (an undeclared ``fn``: everything changed)."""
    if not getattr(fn, "declares_effect", False):
        versions.bump_everything()
        return
    if fn.weight_effect is None:
        return
    effect = fn.weight_effect(*args)
    if isinstance(effect, BaseWrite):
        names = effect.hf_names
        versions.bump_base({base_layer_of(n) for n in names} if names is not None else None)
    elif isinstance(effect, AdapterWrite):
        versions.bump_adapter(effect.lora_id)
    else:
        raise TypeError(f"{fn.__qualname__} declares a write effect of type {type(effect).__name__}; "
                        "expected BaseWrite or AdapterWrite")


def writes_base_weights(fn, args: tuple) -> bool:
    """Whether ``fn(engine, *args)`` may write base weights (an undeclared ``fn``: it may)."""
    if not getattr(fn, "declares_effect", False):
        return True
    return fn.weight_effect is not None and isinstance(fn.weight_effect(*args), BaseWrite)
