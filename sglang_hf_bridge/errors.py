"""Every exception the library raises on purpose, in one module (all exported by the package).

Each names the problem and, where there is one, what to do instead; the model stays usable after
any input or adapter error.
"""

from __future__ import annotations

__all__ = [
    "AdapterError",
    "AdapterFileError",
    "AdapterRankError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "DataParallelError",
    "EngineClosedError",
    "InferenceOnlyError",
    "InputValidationError",
    "PeftWrappingError",
    "SGLangBridgeError",
    "SGLangLayoutError",
    "SequenceTooLongError",
    "UnsupportedAdapterError",
    "UnsupportedLoadOptionError",
    "UnsupportedOperationError",
    "WorkerError",
]


class SGLangBridgeError(Exception):
    """The base of every exception below: ``except SGLangBridgeError`` catches any of them. Each also
    subclasses the builtin (ValueError, RuntimeError, OSError, TypeError) callers caught before."""


class CheckpointError(SGLangBridgeError, ValueError):
    """The directory is missing, unreadable, or not a supported masked-LM checkpoint."""


class CheckpointNotFoundError(CheckpointError, OSError):
    """Neither a local directory nor a Hub id found in the cache or on the Hub; an ``OSError`` too,
    as transformers raises for an id it cannot resolve."""


class InputValidationError(SGLangBridgeError, ValueError):
    """Inputs the model cannot run (shapes, dtypes, ids, lengths)."""


class SequenceTooLongError(InputValidationError):
    """One sequence needs more tokens than the engine's token budget (``max_num_tokens``)."""


class InferenceOnlyError(SGLangBridgeError, RuntimeError):
    """``.backward()`` through an engine-backed model: the engine builds no autograd graph."""


class AdapterError(SGLangBridgeError, ValueError):
    """An adapter the engine cannot load (shapes, rank, modules, pool full, LoRA disabled)."""


class UnsupportedAdapterError(SGLangBridgeError, ValueError):
    """A PEFT feature or adapter shape the engine cannot run."""


class AdapterFileError(SGLangBridgeError, ValueError):
    """An adapter directory that is missing or unreadable."""


class AdapterRankError(UnsupportedAdapterError, AdapterError):
    """An adapter rank above the engine's ``max_lora_rank`` (the one class for that limit, wherever
    it is checked); both an :class:`UnsupportedAdapterError` and an :class:`AdapterError`."""


class PeftWrappingError(SGLangBridgeError, TypeError):
    """peft.PeftModel / get_peft_model cannot wrap an engine-backed model."""


class EngineClosedError(SGLangBridgeError, RuntimeError):
    """The model's SGLang engine was closed."""


class WorkerError(SGLangBridgeError, RuntimeError):
    """A tensor-parallel worker process died, hung or failed."""


class UnsupportedLoadOptionError(SGLangBridgeError, ValueError):
    """A transformers ``from_pretrained`` keyword the engine cannot honour (TensorFlow/Flax weights,
    quantization, a multi-device ``device_map``, ``state_dict=`` ...); the message says what to do."""


class UnsupportedOperationError(SGLangBridgeError, RuntimeError):
    """An ``nn.Module``/``PreTrainedModel`` operation an engine-backed model cannot do (moving or
    casting after load, resizing the vocabulary); the message says what to use instead."""


class SGLangLayoutError(SGLangBridgeError, RuntimeError):
    """The installed SGLang does not have the internal layout this bridge was written against
    (raised by :mod:`sglang_hf_bridge.compat`'s accessors; also importable from there)."""


class DataParallelError(SGLangBridgeError, RuntimeError):
    """A distributed launch MeZO cannot train correctly, or another process of the run failed (also
    importable from :mod:`sglang_hf_bridge.training.distributed`)."""
