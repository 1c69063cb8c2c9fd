"""sglang_hf_bridge: transformers' RobertaForMaskedLM interface, executed by SGLang."""

from . import compat as _compat
from . import log_control as _log_control

_compat.configure_sglang_environment()
_log_control.import_sglang_quietly()

from .modeling.base import InferenceOnlyError  # noqa: E402
from .modeling.checkpoint import CheckpointError  # noqa: E402
from .modeling.inputs import InputValidationError  # noqa: E402
from .modeling.roberta import SGLangRobertaForMaskedLM  # noqa: E402
from .engine.adapters import AdapterError  # noqa: E402
from .lora.config import UnsupportedAdapterError  # noqa: E402
from .lora.files import AdapterFileError  # noqa: E402
from .modeling.adapters import PeftWrappingError  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "SGLangRobertaForMaskedLM",
    "CheckpointError",
    "InputValidationError",
    "InferenceOnlyError",
    "AdapterError",
    "AdapterFileError",
    "UnsupportedAdapterError",
    "PeftWrappingError",
]
