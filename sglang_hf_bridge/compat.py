"""Every SGLang 0.5.23 workaround and process-level adjustment, in one place.

Each function says which SGLang behaviour it works around and why; tests in
``tests/test_compat.py`` show the behaviour it avoids. Every read or write of SGLang's private
state (request fields, the tree-cache surface, LoRA buffers, torch version counters) goes through
an accessor here that raises :class:`SGLangLayoutError` when the installed SGLang is not laid out
as 0.5.23 is, instead of silently computing something else.
"""

from __future__ import annotations

import os
import shutil
from types import SimpleNamespace
from typing import Optional, Sequence, Tuple


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


def prepare_process(device: str) -> None:
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


_NO_NCCL = "/nonexistent/sglang-hf-bridge/libnccl-disabled.so"


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
        "SGLANG_NCCL_SO_PATH": os.environ.get("SGLANG_NCCL_SO_PATH", _NO_NCCL),
    }


# --- accessors for SGLang private state ----------------------------------------------------------
class SGLangLayoutError(RuntimeError):
    """The installed SGLang does not have the internal layout this bridge was written against."""


def _require(obj, attr: str, what: str):
    if not hasattr(obj, attr):
        raise SGLangLayoutError(
            f"SGLang internals changed: {what} ({type(obj).__name__}.{attr}) is missing; this bridge "
            "supports sglang==0.5.23"
        )
    return getattr(obj, attr)


class NoPrefixCache(SimpleNamespace):
    """The tree-cache surface ``ScheduleBatch`` uses in 0.5.23, for a cache that allocates slots
    and never shares a prefix (prefix reuse is wrong for a bidirectional encoder)."""

    def supports_swa(self) -> bool:
        return False

    def supports_mamba(self) -> bool:
        return False

    def supports_prefix_sharing(self) -> bool:
        return False

    def evict(self, params) -> None:
        pass

    def maybe_hand_to_session(self, req) -> None:
        pass


def encoder_request(rid: str, input_ids: Sequence[int], lora_id: Optional[str]):
    """An SGLang ``Req`` for one encoder sequence: no sampling, no logprobs, the whole input in
    one extend (fields the scheduler would otherwise fill in while it tokenizes and schedules)."""
    from array import array

    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    req = Req(rid=rid, origin_input_text="", origin_input_ids=array("q", input_ids),
              sampling_params=SamplingParams(max_new_tokens=0), lora_id=lora_id)
    for field in ("full_untruncated_fill_ids", "logprob_start_len", "extend_end"):
        _require(req, field, "a request field the scheduler sets before an extend")
    req.full_untruncated_fill_ids = req.origin_input_ids
    req.logprob_start_len = -1
    req.extend_end = len(req.origin_input_ids)
    return req


def request_prefix_len(req) -> int:
    return _require(req, "prefix_len", "the cached-prefix length of a request")


def request_holds_kv(req) -> bool:
    return bool(_require(_require(req, "kv", "a request's KV state"), "holds_kv", "whether a request holds KV"))


def move_prefill_ids_to_device(batch) -> None:
    """0.5.23 keeps extend input ids on the CPU (``prefill_input_ids_cpu``) until the scheduler's
    overlap thread moves them; without that thread we move them ourselves."""
    if batch.input_ids is None and getattr(batch, "prefill_input_ids_cpu", None) is not None:
        batch.input_ids = batch.prefill_input_ids_cpu.to(batch.device)
        batch.prefill_input_ids_cpu = None


def lora_manager(model_runner):
    """SGLang's LoRA manager of a ModelRunner, or None when LoRA was not enabled."""
    return getattr(model_runner, "lora_manager", None)


def lora_pool_buffers(manager) -> Tuple[dict, dict]:
    """``(A_buffer, B_buffer)`` of the LoRA memory pool: ``{module: [per-layer [slots, ...]]}``."""
    pool = _require(manager, "memory_pool", "the LoRA memory pool")
    return _require(pool, "A_buffer", "LoRA A buffers"), _require(pool, "B_buffer", "LoRA B buffers")


def lora_pool_slot(manager, lora_id: str) -> int:
    pool = _require(manager, "memory_pool", "the LoRA memory pool")
    return _require(pool, "get_buffer_id", "the LoRA pool's slot lookup")(lora_id)


def lora_base_layer(layer):
    """The plain linear layer under SGLang's LoRA wrapper (the layer itself when not wrapped)."""
    return getattr(layer, "base_layer", layer)


def lora_layer_buffers(layer, fused_qkv: bool):
    """The ``[slots, ...]`` A/B buffers a LoRA-wrapped linear layer reads in 0.5.23
    (``A_buffer_qkv``/``B_buffer_qkv`` on the fused QKV layer, ``A_buffer``/``B_buffer`` else).
    Raises instead of returning None: a missing buffer would silently drop LoRA deltas."""
    a, b = ("A_buffer_qkv", "B_buffer_qkv") if fused_qkv else ("A_buffer", "B_buffer")
    return _require(layer, a, "a LoRA layer's A buffer"), _require(layer, b, "a LoRA layer's B buffer")


def tensor_version(tensor) -> int:
    """PyTorch's in-place version counter of a tensor (shared by its views): how an in-place
    edit of an adapter view is noticed without hooks."""
    return _require(tensor, "_version", "torch's tensor version counter")
