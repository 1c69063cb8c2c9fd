"""Every SGLang 0.5.23 workaround and process-level adjustment, in one place.

Each function says which SGLang behaviour it works around and why; tests in
``tests/test_compat.py`` show the behaviour it avoids.
"""

from __future__ import annotations

import os
import shutil
import socket


def configure_sglang_environment() -> None:
    """Set before SGLang is imported.

    ``SGLANG_EXTERNAL_MODEL_PACKAGE`` makes SGLang's model registry import only this project's
    model package instead of all ~200 stock model files (start-up 4 s -> 2 s on the CPU host);
    stock models are still loaded lazily if another SGLang user in the process asks for one.
    A value the user already set is left alone (the runtime registers our class explicitly).
    """
    os.environ.setdefault("SGLANG_EXTERNAL_MODEL_PACKAGE", "sglang_hf_bridge.sglang_models")


def cpu_server_args() -> dict:
    """ServerArgs the CPU host needs.

    SGLang 0.5.23 sizes ``mem_fraction_static`` from GPU memory; on a CPU host its default
    resolves to a negative fraction and ``alloc_memory_pool`` fails with "Loaded weights leave
    no GPU memory for the KV cache under --mem-fraction-static=-0.046". The KV pool is capped
    by ``max_total_tokens`` anyway, so a fixed fraction is safe.
    """
    return {"mem_fraction_static": 0.9}


def free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_process(device: str, tp_size: int) -> None:
    """Environment SGLang reads at start-up on this kind of host."""
    if os.environ.get("SGLANG_USE_CPU_ENGINE"):
        raise RuntimeError(
            "SGLANG_USE_CPU_ENGINE is set: that mode needs sgl-kernel's CPU build, which the "
            "package index does not ship. Unset it; the bridge passes device='cpu' instead."
        )
    if device == "cpu" and shutil.which("lscpu") is None:
        raise RuntimeError("SGLang on CPU needs the 'lscpu' command (package util-linux)")


def init_process_global_configs() -> None:
    """Process-global GEMM/MoE config SGLang's scheduler sets before loading a model
    (mirrors ``sglang/benchmark/one_batch.py``); without it layer construction fails."""
    from sglang.srt.layers.moe import initialize_moe_config
    from sglang.srt.layers.quantization.fp4_utils import initialize_fp4_gemm_config
    from sglang.srt.layers.quantization.fp8_utils import initialize_fp8_gemm_config
    from sglang.srt.layers.quantization.unquant import initialize_bf16_gemm_config

    initialize_moe_config()
    initialize_fp8_gemm_config()
    initialize_bf16_gemm_config()
    initialize_fp4_gemm_config()


# SGLang builds its parallel runtime (torch.distributed world + TP groups) once per process and
# raises if asked again. Single-rank engines in one process share it: the first one builds it,
# the last one to close tears it down, so close-then-load and two live models both work.
_parallel_users = {"count": 0, "key": None}


def check_parallel_runtime_available(device: str, tp_size: int) -> None:
    """Raise before anything starts if this process's parallel runtime is taken."""
    key = (device, tp_size)
    if _parallel_users["count"] > 0 and (_parallel_users["key"] != key or tp_size != 1):
        raise RuntimeError(
            f"another SGLang engine in this process holds the parallel runtime (device, tp_size)="
            f"{_parallel_users['key']}; SGLang builds one per process, so an engine with "
            f"(device, tp_size)={key} cannot start next to it. Close the other model first."
        )


def init_parallel_runtime_once(bootstrap, server_args, device: str, port: int, tp_size: int) -> None:
    check_parallel_runtime_available(device, tp_size)
    if _parallel_users["count"] == 0:
        bootstrap.init_parallel_runtime(server_args=server_args, device=device, dist_port=port)
        _parallel_users["key"] = (device, tp_size)
    _parallel_users["count"] += 1


def release_parallel_runtime() -> None:
    from sglang.srt.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    if _parallel_users["count"] == 0:
        return
    _parallel_users["count"] -= 1
    if _parallel_users["count"] == 0:
        _parallel_users["key"] = None
        destroy_model_parallel()
        destroy_distributed_environment()


# --- LoRA on a GPU-less host ------------------------------------------------------------------
# SGLang 0.5.23's LoRA code pins host memory unconditionally: ``torch.tensor(..., pin_memory=True)``
# in ``sglang.srt.lora.layers`` and ``lora/backend/torch_backend.py``, and ``tensor.pin_memory()``
# in the torch backend's batch preparation. With a CUDA build of torch on a host without a GPU
# both fail with "Found no NVIDIA driver on your system". The fix is narrow: only those two
# modules see a ``torch`` whose constructors ignore ``pin_memory=``, and ``Tensor.pin_memory`` is
# a no-op only while the engine runs (``no_pinning()``), restored right after -- a global patch
# was seen to corrupt later HF loads in the same process.

_PINNING_MODULES = ("sglang.srt.lora.layers", "sglang.srt.lora.backend.torch_backend")


class _TorchWithoutPinning:
    """Stands in for the ``torch`` module inside SGLang's LoRA modules on a GPU-less host."""

    def __init__(self, torch_module):
        self._torch = torch_module

    def __getattr__(self, name):
        attr = getattr(self._torch, name)
        if callable(attr) and name in ("tensor", "zeros", "ones", "empty", "full", "arange", "as_tensor"):
            def without_pinning(*args, _fn=attr, **kwargs):
                kwargs.pop("pin_memory", None)
                return _fn(*args, **kwargs)
            return without_pinning
        return attr


def pinning_unavailable() -> bool:
    import torch

    return not torch.cuda.is_available()


def patch_lora_pinning() -> None:
    """Install the module-scoped ``torch`` stand-in (idempotent; no-op when CUDA is present)."""
    import importlib

    import torch

    if not pinning_unavailable():
        return
    for name in _PINNING_MODULES:
        module = importlib.import_module(name)
        if not isinstance(module.torch, _TorchWithoutPinning):
            module.torch = _TorchWithoutPinning(torch)


class no_pinning:
    """Context manager: ``Tensor.pin_memory`` returns the tensor itself while the engine runs
    on a GPU-less host; the original method is back on exit."""

    _depth = 0
    _original = None

    def __enter__(self):
        import torch

        if pinning_unavailable():
            if no_pinning._depth == 0:
                no_pinning._original = torch.Tensor.pin_memory
                torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
            no_pinning._depth += 1
        return self

    def __exit__(self, *exc):
        import torch

        if pinning_unavailable():
            no_pinning._depth -= 1
            if no_pinning._depth == 0:
                torch.Tensor.pin_memory = no_pinning._original
        return False


# --- tensor parallelism on CPU -----------------------------------------------------------------
def cpu_tensor_parallel_environment(tp_size: int) -> dict:
    """Environment every rank of a CPU TP engine needs, set before SGLang starts.

    ``SGLANG_CPU_OMP_THREADS_BIND``: without it SGLang binds one rank per NUMA node and asserts
    ``ranks <= NUMA nodes`` (one node here); we give each rank its own slice of this process's
    cores ("0|1" for two ranks on two cores).
    ``SGLANG_NCCL_SO_PATH``: with a CUDA build of torch on a GPU-less host SGLang still loads
    libnccl for PyNccl and then crashes ("Expected a cuda device, but got: cpu"); pointing the
    path at a file that does not exist keeps PyNccl off (gloo carries CPU collectives).
    """
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    groups = [cores[i::tp_size] or [cores[i % len(cores)]] for i in range(tp_size)]
    bind = "|".join(",".join(str(c) for c in sorted(g)) for g in groups)
    return {
        "SGLANG_CPU_OMP_THREADS_BIND": os.environ.get("SGLANG_CPU_OMP_THREADS_BIND", bind),
        "SGLANG_NCCL_SO_PATH": os.environ.get("SGLANG_NCCL_SO_PATH", "/nonexistent/sglang-hf-bridge/libnccl-disabled.so"),
    }


def set_parent_death_signal() -> None:
    """Linux: have the kernel SIGKILL this worker when the process that spawned it dies, so TP
    workers never outlive the user's process (even on SIGKILL of the parent)."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
