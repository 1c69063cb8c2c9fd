"""Every exception the library raises on purpose, in one module (all exported by the package).

Each names the problem and, where there is one, what to do instead; the model stays usable after
any input or adapter error.
"""

from __future__ import annotations

__all__ = [
    "AdapterError",
    "AdapterFileError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "EngineClosedError",
    "InferenceOnlyError",
    "InputValidationError",
    "PeftWrappingError",
    "SequenceTooLongError",
    "UnsupportedAdapterError",
    "UnsupportedLoadOptionError",
    "UnsupportedOperationError",
    "WorkerError",
]


class CheckpointError(ValueError):
    """The directory is missing, unreadable, or not a supported masked-LM checkpoint."""


class CheckpointNotFoundError(CheckpointError, OSError):
    """Neither a local directory nor a Hub id found in the cache or on the Hub; an ``OSError`` too,
    as transformers raises for an id it cannot resolve."""


class InputValidationError(ValueError):
    """Inputs the model cannot run (shapes, dtypes, ids, lengths)."""


class SequenceTooLongError(InputValidationError):
    """One sequence needs more tokens than the engine's token budget (``max_num_tokens``)."""


class InferenceOnlyError(RuntimeError):
    """``.backward()`` through an engine-backed model: the engine builds no autograd graph."""


class AdapterError(ValueError):
    """An adapter the engine cannot load (shapes, rank, modules, pool full, LoRA disabled)."""


class UnsupportedAdapterError(ValueError):
    """A PEFT feature or adapter shape the engine cannot run."""


class AdapterFileError(ValueError):
    """An adapter directory that is missing or unreadable."""


class PeftWrappingError(TypeError):
    """peft.PeftModel / get_peft_model cannot wrap an engine-backed model."""


class EngineClosedError(RuntimeError):
    """The model's SGLang engine was closed."""


class WorkerError(RuntimeError):
    """A tensor-parallel worker process died, hung or failed."""


class UnsupportedLoadOptionError(ValueError):
    """A transformers ``from_pretrained`` keyword the engine cannot honour (TensorFlow/Flax weights,
    quantization, a multi-device ``device_map``, ``state_dict=`` ...); the message says what to do."""


class UnsupportedOperationError(RuntimeError):
    """An ``nn.Module``/``PreTrainedModel`` operation an engine-backed model cannot do (moving or
    casting after load, resizing the vocabulary); the message says what to use instead."""
