"""What transformers' scripts, Trainer, pipelines and accelerate do with a model, answered for
weights that live in the SGLang engine rather than in torch parameters.

``from_pretrained``'s transformers keywords: :data:`TRANSFORMERS_LOAD_KEYWORDS` says which are
honoured, ignored or refused; the functions below apply it (``base.from_pretrained`` calls them).

The model's members (:class:`HFSurfaceMixin`): each works on the engine's weights or raises a
clear error saying what to use instead. ``parameters()`` / ``named_parameters()`` stay torch's:
they hold no engine weight (an optimizer over them would train nothing), so the counts and
copies are given by ``num_parameters()``, ``get_memory_footprint()`` and ``state_dict()``.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import math
import os
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn
from transformers import PretrainedConfig

from .. import compat, log_control
from ..checkpoint import read_config, validate_masked_lm_config
from ..engine import hf_parameter_slices, rank_set_hf_tensors
from ..errors import CheckpointError, UnsupportedLoadOptionError, UnsupportedOperationError
from ..hub import HUB_OPTIONS
from ..sglang_models.families import ties_word_embeddings
from ..sglang_models.weight_map import weight_map_for

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------- transformers' keywords
# What from_pretrained does with the keywords scripts pass to transformers' from_pretrained.
# HONOUR: used by SGLangPreTrainedModel.from_pretrained (the Hub look-up options through
# :mod:`sglang_hf_bridge.hub`). IGNORE: accepted and logged at DEBUG -- obsolete download options,
# torch-side loading/placement knobs (the engine loads and places its weights itself).
# ``ignore_mismatched_sizes`` is honoured for a task head only (a checkpoint fine-tuned for another
# number of labels gets a new head, as in transformers); any other size that disagrees with the
# config is refused (:mod:`.load_plan`). A ``(accepted, why)``
# pair: refused with ``why`` unless the value is None or one of ``accepted`` (their defaults).
HONOUR, IGNORE = "honour", "ignore"
TRANSFORMERS_LOAD_KEYWORDS: Dict[str, Any] = {
    "config": HONOUR, "torch_dtype": HONOUR, "device_map": HONOUR, "subfolder": HONOUR,
    "output_loading_info": HONOUR, "use_safetensors": HONOUR, "ignore_mismatched_sizes": HONOUR,
    **dict.fromkeys(HUB_OPTIONS, HONOUR),
    **dict.fromkeys((
        "resume_download", "mirror", "_commit_hash", "_from_auto", "_from_pipeline",
        "low_cpu_mem_usage", "_fast_init", "attn_implementation", "max_memory", "offload_folder",
        "offload_state_dict", "offload_buffers", "disable_mmap", "use_kernels", "kernel_config",
        "allow_all_kernels", "fusion_config", "tqdm_class", "generation_config",
    ), IGNORE),
    "from_tf": ((False,), "TensorFlow weights cannot be read: convert them with transformers "
                          "(RobertaForMaskedLM.from_pretrained(path, from_tf=True).save_pretrained(dir))"),
    "from_flax": ((False,), "Flax weights cannot be read: convert them with transformers "
                            "(RobertaForMaskedLM.from_pretrained(path, from_flax=True).save_pretrained(dir))"),
    "trust_remote_code": ((False,), "the bridge never runs code from a checkpoint directory; it runs its "
                                    "built-in families only (BERT, RoBERTa, XLM-RoBERTa, CamemBERT)"),
    "state_dict": ((), "the engine loads weights from a checkpoint directory: save the state dict with "
                       "save_pretrained (or save_file to model.safetensors next to config.json) and pass that path"),
    "quantization_config": ((), "the engine runs float32, float16 or bfloat16 weights only: pass dtype="),
    "variant": ((), "weight variants are not read: rename model.<variant>.safetensors to model.safetensors"),
    "gguf_file": ((), "GGUF files are not read: convert the model to an HF checkpoint directory"),
    "key_mapping": ((), "checkpoint names are not remapped: save the renamed weights with save_pretrained"),
    "tp_plan": ((), "tensor parallelism runs in SGLang: pass tp_size=N"),
    "distributed_config": ((), "tensor parallelism runs in SGLang: pass tp_size=N"),
    "device_mesh": ((), "tensor parallelism runs in SGLang: pass tp_size=N"),
    "weights_only": ((True,), ".bin files are only ever read with torch.load(weights_only=True)"),
    "adapter_kwargs": (({},), "load adapters after the base model with model.load_adapter(path)"),
    "adapter_name": (("default",), "load adapters after the base model with model.load_adapter(path, name)"),
}
# Config fields the engine is built from (it reads config.json itself): a config= or a config
# keyword may not change them.
ENGINE_CONFIG_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "max_position_embeddings", "type_vocab_size", "pad_token_id", "layer_norm_eps", "hidden_act",
    "position_embedding_type", "tie_word_embeddings", "is_decoder", "add_cross_attention",
)
LOADING_INFO_KEYS = ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")


def _accepted(value, accepted: Tuple) -> bool:
    return value is None or any(value is a or (type(value) is type(a) and value == a) for a in accepted)


def transformers_options(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Pop transformers' keywords from ``kwargs``: refuse those that cannot be honoured, log the
    ignored ones, return the honoured ones."""
    honoured = {}
    for key in [k for k in kwargs if k in TRANSFORMERS_LOAD_KEYWORDS]:
        value, rule = kwargs.pop(key), TRANSFORMERS_LOAD_KEYWORDS[key]
        if rule == HONOUR:
            honoured[key] = value
        elif rule == IGNORE:
            logger.debug("from_pretrained: ignoring %s=%r (no meaning for an SGLang engine: it loads and places "
                         "its own weights)", key, value)
        elif not _accepted(value, rule[0]):
            raise UnsupportedLoadOptionError(f"from_pretrained({key}={value!r}) is not supported: {rule[1]}")
    return honoured


def device_from_device_map(device_map) -> Optional[Union[str, torch.device]]:
    """The one device a transformers ``device_map`` names; several devices are refused."""
    if device_map is None:
        return None
    if isinstance(device_map, str) and device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus > 1:
            raise UnsupportedLoadOptionError(
                f"device_map={device_map!r} would spread the model over {gpus} GPUs; the engine runs on one device "
                "per rank: pass device='cuda' (and tp_size=N for tensor parallelism)")
        return "cuda" if gpus else "cpu"
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise UnsupportedLoadOptionError(
                f"device_map={device_map!r} places parts of the model on different devices; the engine runs on one "
                "device per rank: pass device= (and tp_size=N for tensor parallelism)")
        device_map = devices.pop()
    if isinstance(device_map, int) and not isinstance(device_map, bool):
        return torch.device("cuda", device_map)
    if device_map == "disk":
        raise UnsupportedLoadOptionError("device_map 'disk' (offloading) is not supported: the engine holds the "
                                         "weights in memory")
    return device_map


def _same_option(a, b) -> bool:
    """``"cpu"`` and ``torch.device("cpu")``, ``"float16"`` and ``torch.float16`` are the same."""
    def norm(v):
        if isinstance(v, torch.device) or (isinstance(v, str) and v.split(":")[0] in ("cpu", "cuda")):
            return torch.device(v)
        dtype = getattr(torch, v, None) if isinstance(v, str) else None
        return dtype if isinstance(dtype, torch.dtype) else v
    return norm(a) == norm(b)


def merge_option(name: str, ours, theirs, their_name: str):
    """The bridge's keyword and transformers' spelling of it (``dtype``/``torch_dtype``, ``device``/
    ``device_map``): either may be given; both only when they agree."""
    if theirs is None:
        return ours
    if ours is not None and not _same_option(ours, theirs):
        raise ValueError(f"from_pretrained got {name}={ours!r} and {their_name}={theirs!r}: pass one of them")
    return theirs


def effective_config(checkpoint_config, user_config, kwargs: Dict[str, Any]):
    """The config the model carries: ``config=`` (a PretrainedConfig or a path) or the
    checkpoint's, updated by keywords that are config attributes (popped from ``kwargs``), as
    transformers does. Fields the engine is built from must equal the checkpoint's."""
    if isinstance(user_config, (str, os.PathLike)):
        user_config = read_config(os.fspath(user_config))
    elif user_config is not None and not isinstance(user_config, PretrainedConfig):
        raise TypeError(f"from_pretrained(config=...) takes a PretrainedConfig or a path, got "
                        f"{type(user_config).__name__}")
    config = copy.deepcopy(user_config if user_config is not None else checkpoint_config)
    for key in [k for k in kwargs if not k.startswith("_") and hasattr(config, k)
                and not callable(getattr(config, k))]:
        setattr(config, key, kwargs.pop(key))
    for field in ENGINE_CONFIG_FIELDS:
        ours, theirs = getattr(checkpoint_config, field, None), getattr(config, field, None)
        if ours != theirs:
            raise CheckpointError(
                f"config {field}={theirs!r} does not match the checkpoint's config.json ({field}={ours!r}); the "
                "engine is built from the checkpoint: convert the checkpoint with transformers instead")
    validate_masked_lm_config(config)
    return config


@functools.lru_cache(maxsize=1)
def _server_args_fields() -> frozenset:
    with log_control.quiet_sglang():
        from sglang.srt.server_args import ServerArgs
    fields = getattr(ServerArgs, "__struct_fields__", None) or inspect.signature(ServerArgs).parameters
    return frozenset(fields)


def engine_options(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """What is left must be SGLang ``ServerArgs`` fields (checked only when something is left:
    importing SGLang takes seconds)."""
    unknown = sorted(set(kwargs) - _server_args_fields()) if kwargs else []
    if unknown:
        raise TypeError(
            f"from_pretrained() got unexpected keyword argument(s) {unknown}: not transformers' from_pretrained "
            "keywords, config attributes, nor SGLang ServerArgs fields")
    return dict(kwargs)


# ---------------------------------------------------------------------- the model's members
# HF names of nn.Embedding weights (what ``num_parameters(exclude_embeddings=True)`` leaves out).
_EMBEDDING_SUFFIXES = (
    "embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight",
)
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


def _state_aliases(config, prefix: str, head: str) -> Dict[str, Optional[str]]:
    """transformers state-dict names that are no engine weight of their own: the HF name they
    stand for, or None (skipped). Tied: the decoder is the word embeddings and the head's bias.
    Untied: HF's forward uses the decoder's bias and never reads the head's separate bias."""
    names = weight_map_for(config, head)
    decoder, bias = names.head_decoder, names.head_bias
    buffers = dict.fromkeys(f"{prefix}.{b}" if prefix else b for b in _BUFFERS)
    if decoder is None:  # a task head: no tied copies
        return buffers
    if ties_word_embeddings(config):
        return {f"{decoder}.weight": None, f"{decoder}.bias": None, **buffers}
    return {f"{decoder}.bias": bias, bias: None, **buffers}


def names_prefix(model) -> str:
    """The base prefix the model's own state-dict names carry ("" for the base model class)."""
    return weight_map_for(model.config, model.head_spec.name).hf_prefix


def _frozen_embedding(weight: torch.Tensor, padding_idx: Optional[int]) -> nn.Embedding:
    """An ``nn.Embedding`` whose weight shares ``weight``'s memory (no copy, no gradient)."""
    return nn.Embedding(weight.shape[0], weight.shape[1], padding_idx=padding_idx, _weight=weight, _freeze=True,
                        device=weight.device, dtype=weight.dtype)


def _frozen_linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` (``out = in @ weight.T + bias``) whose tensors share the given memory."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


class HFSurfaceMixin:
    """transformers/torch members of the engine-backed models (mixed in before PreTrainedModel)."""

    # ------------------------------------------------------------------ embeddings
    def _engine_tensor(self, engine_name: str) -> torch.Tensor:
        """An engine weight cut to the real vocabulary: a view at tp_size 1 (in-place changes are
        live), a gathered copy under tensor parallelism (changes do not reach the engine)."""
        if self.runtime.config.tp_size == 1:
            model = self.runtime.model
            return model.layouts[engine_name].local(model.get_parameter(engine_name).detach(), rank=0)
        return self.runtime.full_parameters()[engine_name]

    def get_input_embeddings(self) -> nn.Embedding:
        """An ``nn.Embedding`` over the engine's word embeddings (``vocab_size`` rows): a view at
        ``tp_size=1``, a gathered read-only copy under tensor parallelism."""
        return _frozen_embedding(self._engine_tensor("embeddings.word_embeddings.weight"), self.config.pad_token_id)

    def get_output_embeddings(self) -> Optional[nn.Linear]:
        """An ``nn.Linear`` over the engine's decoder (the word embeddings when tied) and
        ``lm_head.bias``; views at ``tp_size=1``, gathered copies under tensor parallelism. None for
        a model without a masked-LM head (as transformers' task classes)."""
        if self.head_spec.outputs != "vocab":
            return None
        tied = ties_word_embeddings(self.config)
        weight = self._engine_tensor("embeddings.word_embeddings.weight" if tied else "lm_head.decoder.weight")
        return _frozen_linear(weight, self._engine_tensor("lm_head.bias"))

    def set_input_embeddings(self, value) -> None:
        raise UnsupportedOperationError(
            "the embeddings live in the SGLang engine and cannot be replaced by a module: change the weights "
            "in place through get_input_embeddings().weight (tp_size=1), or save a checkpoint with the new "
            "embeddings (transformers' RobertaForMaskedLM) and load that")

    def set_output_embeddings(self, value) -> None:
        self.set_input_embeddings(value)

    def resize_token_embeddings(self, new_num_tokens: Optional[int] = None, pad_to_multiple_of: Optional[int] = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """A no-op returning the input embeddings when the size does not change; the engine's
        vocabulary is fixed when it starts, so any other size is refused."""
        current = self.config.vocab_size
        target = current if new_num_tokens is None else int(new_num_tokens)
        if pad_to_multiple_of is not None:
            target = math.ceil(target / pad_to_multiple_of) * pad_to_multiple_of
        if target != current:
            raise UnsupportedOperationError(
                f"resize_token_embeddings({new_num_tokens}) would change the vocabulary from {current} to {target} "
                "rows, but the SGLang engine's vocabulary is fixed when it starts. Resize with transformers' "
                "RobertaForMaskedLM.from_pretrained(...).resize_token_embeddings(...), save_pretrained, and load "
                "that checkpoint here")
        return self.get_input_embeddings()

    def tie_weights(self, *args, **kwargs) -> None:
        """A no-op: the engine ties the decoder to the word embeddings itself when the config says so."""

    # ------------------------------------------------------------------ sizes
    def _engine_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """HF name -> full shape of every engine weight (tied copies once; no vocabulary padding)."""
        shapes = getattr(self, "_engine_shapes_cache", None)
        if shapes is None or shapes[0] is not self.runtime:
            slices = hf_parameter_slices(self.runtime.model)
            shapes = (self.runtime, {n: tuple(s.shape) for n, s in slices.items()})
            self._engine_shapes_cache = shapes
        return shapes[1]

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """The engine's parameter count, as transformers counts ``RobertaForMaskedLM``'s (tied
        weights once; untied, transformers also counts an ``lm_head.bias`` its forward never uses,
        which the engine does not hold). ``only_trainable`` counts the same: MeZO can change every
        engine weight."""
        return sum(math.prod(shape) for name, shape in self._engine_shapes().items()
                   if not (exclude_embeddings and name.endswith(_EMBEDDING_SUFFIXES)))

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes of the engine's weights at full size (all ranks together), as transformers counts
        its parameters; the KV and LoRA pools are not included."""
        return self.num_parameters() * torch.empty((), dtype=self.dtype).element_size()

    @classmethod
    def can_generate(cls) -> bool:
        return False

    # ------------------------------------------------------------------ gradient checkpointing
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs) -> None:
        """A no-op (logged): the engine keeps no activations for a backward pass, so there is
        nothing to trade for memory. Scripts that set ``gradient_checkpointing=True`` run as is."""
        logger.info("gradient checkpointing is a no-op on %s: the SGLang engine stores no activations for "
                    "backward (forward-only; see MeZOTrainer)", type(self).__name__)

    def gradient_checkpointing_disable(self) -> None:
        """A no-op, as :meth:`gradient_checkpointing_enable`."""

    # ------------------------------------------------------------------ device and dtype
    def _same_device(self, device: torch.device) -> bool:
        engine = self.device
        return device.type == engine.type and (device.index or 0) == (engine.index or 0)

    def to(self, *args, **kwargs):
        """A no-op when the device/dtype are the engine's; anything else raises: the engine's
        device and dtype are chosen when it starts."""
        device, dtype, _, _ = compat.parse_to_arguments(*args, **kwargs)
        if device is not None and not self._same_device(torch.device(device)):
            raise UnsupportedOperationError(
                f"cannot move {type(self).__name__} to {device}: its SGLang engine runs on {self.device}. Choose "
                f"the device at load time: from_pretrained(path, device={str(device)!r})")
        if dtype is not None and dtype != self.dtype:
            raise UnsupportedOperationError(
                f"cannot cast {type(self).__name__} to {dtype}: its SGLang engine runs in {self.dtype}. "
                + (f"Choose the dtype at load time: from_pretrained(path, dtype={dtype})"
                   if dtype in (torch.float32, torch.float16, torch.bfloat16)
                   else "The engine runs float32, float16 or bfloat16, chosen at load time: "
                   "from_pretrained(path, dtype=torch.bfloat16 ...)"))
        return self

    def cuda(self, device=None):
        return self.to(torch.device("cuda", device) if isinstance(device, int) else (device or "cuda"))

    def cpu(self):
        return self.to("cpu")

    def half(self):
        return self.to(torch.float16)

    def float(self):
        return self.to(torch.float32)

    def bfloat16(self):
        return self.to(torch.bfloat16)

    def double(self):
        return self.to(torch.float64)

    # ------------------------------------------------------------------ state dicts
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """transformers' HF-named state (``roberta.…``, q/k/v separate, tied decoder included) as
        full copies of the engine's weights, gathered from every rank. Untied, ``lm_head.bias`` is
        the decoder's bias (the one transformers' forward uses)."""
        from .saving import engine_state_dict

        state = engine_state_dict(self.runtime.full_parameters(), self.runtime.model.layouts, self.config,
                                  self.head_spec.name)
        # transformers' state dict also lists the tied copies it does not save
        names = weight_map_for(self.config, self.head_spec.name)
        word_embeddings = names.to_hf_name("embeddings.word_embeddings.weight")
        if names.head_decoder is not None:  # the masked-LM head
            if ties_word_embeddings(self.config) and word_embeddings in state:
                state.setdefault(f"{names.head_decoder}.weight", state[word_embeddings])
            if names.head_bias in state:
                state.setdefault(f"{names.head_decoder}.bias", state[names.head_bias])
        out = destination if destination is not None else {}
        out.update({prefix + name: tensor for name, tensor in state.items()})
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Write HF-named tensors (what :meth:`state_dict` returns) into the engine's weights.
        Tied copies and buffers are skipped; ``strict`` refuses missing and unexpected names."""
        shapes, aliases = self._engine_shapes(), _state_aliases(self.config, names_prefix(self), self.head_spec.name)
        tensors, unexpected = {}, []
        for name, value in state_dict.items():
            if name in aliases:
                if aliases[name] is None:
                    continue
                name = aliases[name]
            if name in shapes:
                if tuple(value.shape) != shapes[name]:
                    raise ValueError(f"load_state_dict: {name} has shape {tuple(value.shape)}, the engine's is "
                                     f"{shapes[name]}")
                tensors[name] = value.detach().to("cpu")
            else:
                unexpected.append(name)
        missing = sorted(set(shapes) - set(tensors))
        if strict and (missing or unexpected):
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}: missing keys {missing}, "
                               f"unexpected keys {sorted(unexpected)}")
        if tensors:
            self.runtime.collective_rpc(rank_set_hf_tensors, tensors)
        return nn.modules.module._IncompatibleKeys(missing, sorted(unexpected))
