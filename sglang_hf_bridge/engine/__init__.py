"""The engine room: one runtime object owns SGLang's ModelRunner on every rank (start, forward,
close). Importing it does not import SGLang; starting a runtime does.

The face (``sglang_hf_bridge.modeling``) and training (``sglang_hf_bridge.training``) reach the
engine only through this interface:

* :class:`EngineConfig` / :class:`LoRAEngineConfig` to start an :class:`EncoderRuntime`;
* :class:`EncoderCall` in, :class:`EncoderResult` out (``runtime.forward``);
* ``runtime.load_adapter`` / ``unload_adapter`` / ``adapter`` / ``adapter_matrices`` for LoRA;
* ``runtime.collective_rpc(op, ...)`` with the rank operations below (MeZO's in-place updates,
  checkpoint resume), ``runtime.full_parameters()`` for saving;
* ``runtime.caches`` (weight versions, the result and frozen-layer caches).
"""

from .config import EngineConfig, LoRAEngineConfig
from .directions import (
    NamedSlice,
    add_scaled_directions,
    fill_direction,
    method_perturb,
    method_prepare,
    method_update,
    zo_update,
)
from .gemm import PATHS as GEMM_PATHS
from .runtime import EncoderRuntime
from .types import EncoderCall, EncoderResult, EncoderSequence, Logits, LogitsDestination, QueryOnlySpec, SequenceResult
from .versions import HEAD, base_layer_of, min_layer_of
from .weights import (
    hf_parameter_slices,
    rank_copy_adapter,
    rank_method_perturb,
    rank_method_prepare,
    rank_method_state,
    rank_method_update,
    rank_perturb_adapter,
    rank_perturb_weights,
    rank_set_adapter_tensors,
    rank_set_hf_tensors,
    rank_set_method_state,
    rank_update_adapter,
    rank_update_weights,
)

__all__ = [
    "EngineConfig", "LoRAEngineConfig", "EncoderRuntime", "GEMM_PATHS",
    "EncoderCall", "EncoderResult", "EncoderSequence", "Logits", "LogitsDestination", "QueryOnlySpec", "SequenceResult",
    "NamedSlice", "add_scaled_directions", "fill_direction", "zo_update", "hf_parameter_slices",
    "method_perturb", "method_prepare", "method_update", "rank_method_perturb", "rank_method_prepare",
    "rank_method_state", "rank_method_update", "rank_set_method_state",
    "HEAD", "base_layer_of", "min_layer_of",
    "rank_copy_adapter", "rank_perturb_adapter", "rank_perturb_weights", "rank_set_adapter_tensors",
    "rank_set_hf_tensors", "rank_update_adapter", "rank_update_weights",
]
