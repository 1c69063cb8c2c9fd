"""Which PEFT LoRA configs the engine runs, resolved into a small spec; everything else is a
clear error naming the feature (never a silent drop of adapter weights)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import FrozenSet, Tuple

from ..errors import AdapterRankError, UnsupportedAdapterError
from .names import hf_module_names, hf_module_to_engine


@dataclass(frozen=True)
class AdapterSpec:
    rank: int
    lora_alpha: float
    use_rslora: bool
    targets: FrozenSet[Tuple[int, str]]  # (layer, engine module)
    # The model's head modules this adapter trains whole (PEFT's modules_to_save: ``classifier``,
    # ``qa_outputs``): each row with this adapter runs the adapter's copy of them.
    head_modules: Tuple[str, ...] = ()

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def resolve_head_modules(modules_to_save, head_modules: Tuple[str, ...], module_names) -> Tuple[str, ...]:
    """PEFT's ``modules_to_save`` (matched as PEFT matches it: a module whose name is the entry or
    ends with ``.entry``) -> the head modules it names. Entries matching nothing are ignored, as
    PEFT ignores them (its SEQ_CLS default lists ``classifier`` and ``score``); an entry matching
    an encoder module is refused (only a task head can be an adapter's own)."""
    found = []
    for entry in modules_to_save or ():
        matched = [m for m in (*module_names, *head_modules) if m == entry or m.endswith(f".{entry}")]
        encoder = [m for m in matched if m not in head_modules]
        if encoder:
            raise UnsupportedAdapterError(
                f"modules_to_save={entry!r} names {encoder[0]}: the engine trains whole copies of the task head "
                f"only ({', '.join(head_modules) or 'this model has none'})")
        found += [m for m in matched if m not in found]
    return tuple(found)


def resolve_adapter_spec(peft_config, model_config, max_rank: int, head_modules: Tuple[str, ...] = (),
                         head: str = None) -> AdapterSpec:
    """Check a ``peft.LoraConfig`` against what the engine runs and resolve its targets with
    PEFT's own matching rules (names, regex, ``layers_to_transform``, ``exclude_modules``).
    ``head_modules``: the task head's modules an adapter may save whole (``modules_to_save``)."""
    from peft import PeftType
    from peft.tuners.tuners_utils import check_target_module_exists

    c = peft_config
    if getattr(c, "peft_type", None) not in (PeftType.LORA, "LORA"):
        raise UnsupportedAdapterError(f"only LoRA adapters are supported, got peft_type={c.peft_type}")
    unsupported = [
        ("use_dora", getattr(c, "use_dora", False), "DoRA (use_dora=True)"),
        ("modules_to_save", getattr(c, "modules_to_save", None) and not head_modules,
         "modules_to_save (fully trained extra modules) on a model without a task head"),
        ("bias", getattr(c, "bias", "none") != "none", f"bias training (bias={getattr(c, 'bias', None)!r})"),
        ("lora_bias", getattr(c, "lora_bias", False), "lora_bias"),
        ("rank_pattern", getattr(c, "rank_pattern", None), "per-module ranks (rank_pattern)"),
        ("alpha_pattern", getattr(c, "alpha_pattern", None), "per-module alphas (alpha_pattern)"),
        ("fan_in_fan_out", getattr(c, "fan_in_fan_out", False), "fan_in_fan_out"),
        ("layer_replication", getattr(c, "layer_replication", None), "layer_replication"),
        ("trainable_token_indices", getattr(c, "trainable_token_indices", None), "trainable_token_indices"),
        ("target_parameters", getattr(c, "target_parameters", None), "target_parameters"),
        ("use_qalora", getattr(c, "use_qalora", False), "QALoRA"),
        ("alora_invocation_tokens", getattr(c, "alora_invocation_tokens", None), "aLoRA"),
    ]
    for _, value, what in unsupported:
        if value:
            raise UnsupportedAdapterError(f"the SGLang engine cannot run {what}; this adapter uses it")
    if not isinstance(c.r, int) or c.r < 1:
        raise UnsupportedAdapterError(f"rank r={c.r!r} must be a positive integer")
    if c.r > max_rank:
        raise AdapterRankError(
            f"adapter rank r={c.r} is above the engine's max_lora_rank={max_rank}; "
            "load the model with a larger max_lora_rank"
        )
    targets, not_runnable = set(), []
    module_names = hf_module_names(model_config, head)
    saved = resolve_head_modules(getattr(c, "modules_to_save", None), head_modules, module_names)
    for name in module_names:
        if check_target_module_exists(c, name):
            key = hf_module_to_engine(name, model_config)
            (targets.add(key) if key else not_runnable.append(name))
    if not_runnable:
        raise UnsupportedAdapterError(f"LoRA on {', '.join(not_runnable)} is not supported by the engine")
    if not targets:
        raise UnsupportedAdapterError(
            f"target_modules={c.target_modules!r} match no module of this model "
            "(expected names among query, key, value, dense, or regexes over "
            "roberta.encoder.layer.N.attention.self.query etc.)"
        )
    return AdapterSpec(rank=c.r, lora_alpha=float(c.lora_alpha), use_rslora=bool(c.use_rslora),
                       targets=frozenset(targets), head_modules=saved)
