"""The engine room: one runtime object owns the SGLang ModelRunner (start, forward, close).

The face (``sglang_hf_bridge.modeling``) and training (``sglang_hf_bridge.training``) reach it
only through this interface: :class:`EngineConfig` to start, :class:`EncoderCall` in,
:class:`EncoderResult` out, ``runtime.adapters`` for LoRA slots, ``run_on_all_ranks`` with
the lockstep operations of :mod:`sglang_hf_bridge.engine.weights`, and ``runtime.caches``
(:class:`EngineCaches`: weight versions, the result and frozen-layer caches).
"""

from .caching import EngineCaches
from .config import EngineConfig, LoRAEngineConfig
from .runtime import EncoderRuntime
from .tp import TensorParallelRuntime, WorkerError
from .types import EncoderCall, EncoderResult, EncoderSequence, SequenceResult

__all__ = ["EngineCaches", "EngineConfig", "LoRAEngineConfig", "EncoderRuntime", "TensorParallelRuntime", "WorkerError",
           "EncoderCall", "EncoderResult", "EncoderSequence", "SequenceResult"]
