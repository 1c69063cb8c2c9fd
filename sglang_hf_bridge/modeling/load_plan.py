"""What a checkpoint's tensors mean to the model, decided before any engine starts, as
transformers' ``*ForMaskedLM.from_pretrained`` decides it.

The oracle is transformers' own class, built on the meta device from the config (no memory, no
weights): its state-dict names and shapes are what a checkpoint must provide. So the head is
decided by the tensors present, never by the class name an owner wrote in ``architectures``;
tensors the class does not use (a pooler, the NSP head, extra task heads, layers beyond
``num_hidden_layers``) are reported as unexpected keys and not loaded; a shape that disagrees with
the config is refused naming the tensor and the config field. Unlike transformers, a tensor the
model needs but the checkpoint lacks is an error, never a random initialisation: a silently random
layer would give wrong answers.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, Tuple

import torch

from ..checkpoint import NEUTRAL_HEAD_HINT, SUPPORTED_MODEL_TYPES, CheckpointFiles, checkpoint_tensor_shapes
from ..errors import CheckpointError
from ..sglang_models.families import ties_word_embeddings
from ..sglang_models.heads import MASKED_LM, Head, task_head_rows
from ..sglang_models.weight_map import weight_map_for

logger = logging.getLogger(__name__)
# Old checkpoints' position-id buffers: transformers leaves them out of unexpected_keys.
_IGNORED_UNEXPECTED = re.compile(r"(^|\.)position_ids$")

# Config fields that size the tensors, named in a size-mismatch error (first match wins).
SIZE_FIELDS = ("hidden_size", "vocab_size", "intermediate_size", "max_position_embeddings", "type_vocab_size")
FIELD_HINTS = {"max_position_embeddings": ("position_embeddings",), "type_vocab_size": ("token_type",),
               "vocab_size": ("word_embeddings", "decoder", "predictions.bias", "lm_head.bias"),
               "intermediate_size": ("intermediate", "output.dense")}


@dataclass(frozen=True)
class LoadPlan:
    """``skip``: checkpoint names the engine does not load (the unexpected keys, as they are spelt
    in the files); ``new_tensors``: a task head the checkpoint lacks, initialised as transformers
    initialises it (HF names); ``loading_info``: what ``output_loading_info=True`` returns
    (transformers' keys and types)."""

    skip: FrozenSet[str]
    loading_info: Dict[str, Any] = field(default_factory=dict)
    new_tensors: Dict[str, torch.Tensor] = field(default_factory=dict)


def reference_model(hf_class_name: str, config):
    """transformers' class for ``config`` on the meta device; its refusals (heads that do not divide
    the hidden size, ...) become CheckpointErrors."""
    import transformers

    hf_class = getattr(transformers, hf_class_name)
    try:
        with torch.device("meta"):
            return hf_class(config)
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"the config cannot build {hf_class_name}: {e}") from e


def _tied_targets(model, config) -> Dict[str, str]:
    """Tied name -> its source (the decoder -> the word embeddings) for this config."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if tied is None:  # older transformers: the class table, applied when the config ties
        tied = getattr(model, "_tied_weights_keys", None) or {}
        if not isinstance(tied, dict) or not ties_word_embeddings(config):
            tied = {}
    return dict(tied)


def _size_field(config, name: str, ckpt_shape: Tuple[int, ...], model_shape: Tuple[int, ...]) -> str:
    """The config field behind the first dimension where the shapes differ (the tensor's own field
    when several fields have that value)."""
    for ours, theirs in zip(model_shape, ckpt_shape):
        if ours != theirs:
            fields = [f for f in SIZE_FIELDS if getattr(config, f, None) == ours]
            fields.sort(key=lambda f: not any(hint in name for hint in FIELD_HINTS.get(f, ())))
            return f"config.{fields[0]}={ours}" if fields else f"a dimension of {ours} derived from the config"
    return f"{len(model_shape)} dimensions"


def new_head_tensors(model, missing) -> Dict[str, torch.Tensor]:
    """The ``missing`` tensors of transformers' ``model`` (built on the meta device) initialised
    exactly as its ``from_pretrained`` initialises them: every other tensor marked initialised, the
    missing ones materialised on the CPU, then transformers' own ``initialize_weights`` (its
    ``_init_weights`` per module, children first; the same draws from torch's global generator in
    the same order, so the same seed gives the same head)."""
    missing = set(missing)
    for name, tensor in list(model.state_dict(keep_vars=True).items()):
        if name in missing:
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            setattr(module, attr, torch.nn.Parameter(torch.empty_like(tensor, device="cpu"),
                                                     requires_grad=tensor.requires_grad))
        else:
            tensor._is_hf_initialized = True
    model.initialize_weights()
    state = model.state_dict()
    return {name: state[name].detach().clone() for name in sorted(missing)}


def plan_checkpoint_load(hf_class_name: str, files: CheckpointFiles, config, source: str,
                         head: Head = MASKED_LM, ignore_mismatched_sizes: bool = False) -> LoadPlan:
    """Check the checkpoint's tensors against transformers' ``hf_class_name`` built from ``config``
    and decide what the engine loads. ``source`` names the checkpoint in messages and logs. A task
    ``head`` the checkpoint lacks is initialised as transformers initialises it (reported in
    ``missing_keys`` with transformers' warning); any other missing tensor is refused."""
    shapes = checkpoint_tensor_shapes(files)
    names = weight_map_for(config, head.name)
    model = reference_model(hf_class_name or SUPPORTED_MODEL_TYPES[config.model_type], config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = _tied_targets(model, config)
    present = {names.hf_key(name): name for name in shapes}  # HF spelling -> the file's spelling

    head_names = {names.to_hf_name(c) for c, _, _ in task_head_rows(head.shape(names.family))} \
        if head.new_when_missing else set()
    if not head.new_when_missing and not any(k.startswith(names.head_prefix) for k in present):
        raise CheckpointError(f"{source!r} has no {names.head_prefix}* tensors: it is an encoder without a "
                              "masked-LM head" + (NEUTRAL_HEAD_HINT if config.model_type == "bert" else ""))
    mismatched, resized = [], set()
    for key, name in present.items():
        if key in expected and shapes[name] != expected[key] and ignore_mismatched_sizes and key in head_names:
            resized.add(key)  # a head fine-tuned for another num_labels: a new one, as transformers
        elif key in expected and shapes[name] != expected[key]:
            mismatched.append(f"{name!r}: shape {list(shapes[name])} in the checkpoint, {list(expected[key])} for "
                              f"the config ({_size_field(config, key, shapes[name], expected[key])})")
    if mismatched:
        raise CheckpointError(
            f"{source!r}: tensor sizes disagree with its config.json ({len(mismatched)} tensor(s)): "
            + "; ".join(mismatched[:4]) + (" ..." if len(mismatched) > 4 else "")
            + ". Fix config.json (or the keywords given to from_pretrained) to match the weights (transformers refuses "
            "this checkpoint too" + ("; for a task head, ignore_mismatched_sizes=True gives a new one" if head_names
                                     else "") + ")")
    missing = sorted(k for k in expected if k not in present and tied.get(k) not in present)
    new = [k for k in missing if k in head_names]
    missing = [k for k in missing if k not in head_names]
    if missing:
        raise CheckpointError(
            f"{source!r} lacks {len(missing)} tensor(s) the model needs: {', '.join(missing[:6])}"
            + (" ..." if len(missing) > 6 else "")
            + ". transformers would initialise them randomly (wrong answers); the bridge refuses")
    unexpected = {k for k in present if k not in expected and not _IGNORED_UNEXPECTED.search(k)}
    skip = {present[k] for k in present if k not in expected} | {present[k] for k in resized}
    if unexpected:
        logger.warning("Some weights of the checkpoint at %s were not used when initializing %s: %s\n- This IS "
                       "expected when the checkpoint was trained with other heads or a larger model (a pooler, "
                       "the next-sentence head, extra task heads).", source, hf_class_name, sorted(unexpected))
    new_tensors = new_head_tensors(model, set(new) | resized) if (new or resized) else {}
    if resized:
        logger.warning("Some weights of %s were not initialized from the model checkpoint at %s and are newly "
                       "initialized because the shapes did not match: %s", hf_class_name, source, sorted(resized))
    if new:
        logger.warning("Some weights of %s were not initialized from the model checkpoint at %s and are newly "
                       "initialized: %s\nYou should probably TRAIN this model on a down-stream task to be able to "
                       "use it for predictions and inference.", hf_class_name, source, new)
    # transformers reports the file's own spelling, without the position-id buffers old files carry
    info = {"missing_keys": set(new), "unexpected_keys": {present[k] for k in unexpected},
            "mismatched_keys": set(resized), "error_msgs": []}
    return LoadPlan(frozenset(skip), info, new_tensors)
