"""Keep SGLang's console output in line with transformers' logging verbosity.

At transformers' default verbosity (WARNING) SGLang's info/warning lines and the warnings its
imports emit on a CPU host are hidden; ``transformers.logging.set_verbosity_info()`` (or
``TRANSFORMERS_VERBOSITY=info``) lets them through.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

from transformers.utils import logging as hf_logging

_SGLANG_LOGGERS = ("sglang",)


def sglang_level() -> int:
    level = hf_logging.get_verbosity()
    return logging.ERROR if level >= logging.WARNING else level


# Lines that are expected on a CPU host (the PyNccl probe the TP workaround disables, torch's
# CUDA_HOME probe when SGLang compiles a helper): hidden unless transformers is at INFO or below.
_EXPECTED_NOISE = ("sglang.srt.distributed.device_communicators.pynccl_wrapper", "torch.utils.cpp_extension")


def apply_sglang_level() -> None:
    level = sglang_level()
    for name in _EXPECTED_NOISE:
        logging.getLogger(name).setLevel(logging.CRITICAL if level >= logging.ERROR else level)
    for name in _SGLANG_LOGGERS:
        logging.getLogger(name).setLevel(level)
    # SGLang's configure_logger attaches handlers to the root logger in some paths.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("sglang."):
            lg = logging.getLogger(name)
            if lg.level != logging.NOTSET and lg.level < level:
                lg.setLevel(level)


def progress_enabled() -> bool:
    return hf_logging.is_progress_bar_enabled()


@contextlib.contextmanager
def quiet_sglang():
    """Run SGLang start-up with its loggers and Python warnings at the chosen level."""
    apply_sglang_level()
    verbose = hf_logging.get_verbosity() < logging.WARNING
    with warnings.catch_warnings():
        if not verbose:
            warnings.simplefilter("ignore")
        yield
    apply_sglang_level()


def import_sglang_quietly() -> None:
    """Import the SGLang modules the engine uses with import-time warnings filtered."""
    with quiet_sglang():
        import sglang.srt.managers.schedule_batch  # noqa: F401
        import sglang.srt.model_executor.model_runner  # noqa: F401
