"""Every SGLang 0.5.23 workaround and process-level adjustment, in one place.

Each function says which SGLang behaviour it works around and why; tests in
``tests/test_compat.py`` show the behaviour it avoids. Every read or write of SGLang's private
state (request fields, the tree-cache surface, LoRA buffers, torch version counters) goes through
an accessor here that raises :class:`SGLangLayoutError` when the installed SGLang is not laid out
as 0.5.23 is, instead of silently computing something else.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Dict, Iterator, Optional, Sequence, Tuple

from .errors import SGLangLayoutError  # defined in errors.py; importable from here too


def configure_sglang_environment() -> None:
    """Set before SGLang is imported.

    ``SGLANG_EXTERNAL_MODEL_PACKAGE`` makes SGLang's model registry import only this project's
    model package instead of all ~200 stock model files, which start-up would otherwise spend time
    importing (measured in docs/architecture.md, "Start-up"); stock models are still loaded lazily
    if another SGLang user in the process asks for one.
    A value the user already set is left alone (the runtime registers our class explicitly).
    """
    os.environ.setdefault("SGLANG_EXTERNAL_MODEL_PACKAGE", "sglang_hf_bridge.sglang_models")


def cpu_server_args() -> dict:
    """ServerArgs the CPU host needs.

    SGLang 0.5.23 sizes the default ``mem_fraction_static`` as (capacity - reserve) / capacity,
    with capacity = the host's RAM per NUMA node and a reserve of ~25 GB on CPU (1.5 MB per
    prefill token). On a host under ~25 GiB per node (the 24 GiB CI host) it is negative and
    start-up fails with "Loaded weights leave no GPU memory for the KV cache under
    --mem-fraction-static=-0.046"; on a larger host the default works, so the failure depends
    on the machine. The KV pool is capped by ``max_total_tokens`` anyway: a fixed fraction is
    safe everywhere.
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
    """Build the process's parallel runtime (first user only), where its ranks meet as
    :func:`register_rendezvous` said for ``port`` -- by default, for one process, a private
    ``file://`` rendezvous and loopback gloo sockets (see :class:`Rendezvous`)."""
    check_parallel_runtime_available(device, tp_size)
    if _parallel_users["count"] == 0:
        rendezvous = _rendezvous_by_port.pop(port, None)
        if rendezvous is None:
            rendezvous = private_rendezvous() if tp_size == 1 else Rendezvous()
        # torch's init_process_group wraps sys.excepthook to prefix every later traceback with
        # "[rank0]: " -- and wraps it again on each start, for the life of the process. The engine's
        # rank 0 is the user's own process: its tracebacks stay the user's (workers report theirs).
        hook = sys.excepthook
        try:
            with rendezvous.applied():
                bootstrap.init_parallel_runtime(server_args=server_args, device=device, dist_port=port)
        except BaseException:
            rendezvous.discard()
            raise
        finally:
            sys.excepthook = hook
        _parallel_users["key"] = (device, tp_size)
        _parallel_users["rendezvous"] = rendezvous
    _parallel_users["count"] += 1


def release_parallel_runtime() -> None:
    from sglang.srt.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    if _parallel_users["count"] == 0:
        return
    _parallel_users["count"] -= 1
    if _parallel_users["count"] == 0:
        _parallel_users["key"] = None
        try:
            destroy_model_parallel()
            destroy_distributed_environment()
        finally:
            rendezvous = _parallel_users.pop("rendezvous", None)
            if rendezvous is not None:
                rendezvous.discard()


# --- where ranks meet, and how long they wait for each other --------------------------------------
# SGLang 0.5.23 builds torch.distributed's world from ``tcp://HOST:PORT`` (``dist_init_addr``, else
# 127.0.0.1 and the dist port; ``distributed/bootstrap.py::_resolve_dist_init_method``). torch's
# TCPStore behind it listens on EVERY interface (``*:PORT``, whatever HOST says) and admits any
# process that connects, without credentials. gloo's pair sockets bind to the address the host
# name resolves to unless ``GLOO_SOCKET_IFNAME`` names an interface. And the groups wait for a
# silent peer for 30 minutes (torch's default) or, for SGLang's CPU-side groups, 120 minutes.
# (The tests showing each of these are in tests/test_tp_security.py.)
RENDEZVOUS_ENV = "SGLANG_DISTRIBUTED_INIT_METHOD_OVERRIDE"
GLOO_INTERFACE_ENV = "GLOO_SOCKET_IFNAME"
_rendezvous_by_port: Dict[int, "Rendezvous"] = {}


@dataclass
class Rendezvous:
    """How the ranks of one parallel runtime meet; rank 0 decides, workers receive a copy.

    ``init_method``: a ``file://`` path in a private directory on one node (no listening socket
    at all; set through SGLang's ``SGLANG_DISTRIBUTED_INIT_METHOD_OVERRIDE``), None for SGLang's
    own ``tcp://dist_init_addr`` across nodes. ``gloo_interface``: where gloo's sockets bind
    (``GLOO_SOCKET_IFNAME``; ``lo`` on one node). ``start_timeout_s``: SGLang's ``dist_timeout``
    while the groups are built and the engines start (collectives are bounded more tightly once
    the engine runs, :func:`bound_collective_timeouts`). Both variables are set only while SGLang
    builds its groups, then restored: other engines and the user's own torch.distributed in this
    process never see them. ``directory`` is removed by the rank that created it (``owner``).
    """

    init_method: Optional[str] = None
    gloo_interface: Optional[str] = None
    start_timeout_s: Optional[float] = None
    directory: Optional[str] = None
    owner: bool = False

    def for_worker(self, same_node: bool = True) -> "Rendezvous":
        """The copy a worker gets: it never removes the directory, and a follower on another node
        (``same_node=False``) picks its own gloo interface."""
        return Rendezvous(self.init_method, self.gloo_interface if same_node else None,
                          self.start_timeout_s, self.directory, owner=False)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        env = {RENDEZVOUS_ENV: self.init_method, GLOO_INTERFACE_ENV: self.gloo_interface}
        with scoped_environment({k: v for k, v in env.items() if v is not None}):
            if self.start_timeout_s:
                from sglang.srt.runtime_context import get_parallel

                with get_parallel().override(dist_timeout=int(math.ceil(self.start_timeout_s))):
                    yield
            else:
                yield

    def discard(self) -> None:
        if self.owner and self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)


def private_rendezvous(start_timeout_s: Optional[float] = None) -> Rendezvous:
    """One node: a ``file://`` store in a fresh directory only this user can enter (``mkdtemp``:
    mode 0700) and gloo on the loopback interface, so no socket of the parallel runtime is
    reachable from another host."""
    from .process import interface_of_address

    directory = tempfile.mkdtemp(prefix="sglang-hf-bridge-rendezvous-")
    atexit.register(shutil.rmtree, directory, True)  # also when the process ends without close()
    return Rendezvous(init_method="file://" + os.path.join(directory, "store"),
                      gloo_interface=interface_of_address("127.0.0.1") or "lo",
                      start_timeout_s=start_timeout_s, directory=directory, owner=True)


def register_rendezvous(port: int, rendezvous: Rendezvous) -> None:
    """Use ``rendezvous`` for the parallel runtime this process builds on dist port ``port``."""
    _rendezvous_by_port[port] = rendezvous


def forget_rendezvous(port: Optional[int]) -> None:
    """Drop a registration that no runtime used (start-up failed first) and its directory."""
    rendezvous = _rendezvous_by_port.pop(port, None) if port is not None else None
    if rendezvous is not None:
        rendezvous.discard()


@contextlib.contextmanager
def scoped_environment(values: Dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore the old values."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def bound_collective_timeouts(seconds: float) -> int:
    """Make every process group of this process's parallel runtime give up on a silent peer after
    ``seconds``; returns how many groups were set.

    SGLang 0.5.23 creates its groups with ``dist_timeout`` (torch's default, 30 minutes, when
    unset) and each coordinator's CPU-side gloo group with ``gloo_timeout=timedelta(minutes=120)``
    (``parallel_state.GroupCoordinator``), so a stopped or hung rank blocks a collective for half
    an hour or two hours. torch's public ``set_timeout`` lowers a live group's limit; a collective
    that passes it raises (gloo: ``RuntimeError`` "Timed out waiting ...ms"). Called once every
    rank has started, so slow start-up steps keep the start-up limit.
    """
    from datetime import timedelta

    import torch.distributed as dist
    from sglang.srt.distributed import parallel_state

    if not dist.is_initialized():
        return 0
    groups = [default_process_group()]
    for ref in list(_require(parallel_state, "_groups", "SGLang's registry of group coordinators").values()):
        coordinator = ref()
        if coordinator is None:  # a weak reference to a coordinator already gone
            continue
        for group in (_require(coordinator, "device_group", "a group coordinator's device group"),
                      _require(coordinator, "cpu_group", "a group coordinator's CPU group")):
            if group is not None and all(group is not g for g in groups):
                groups.append(group)
    for group in groups:
        dist.set_timeout(timedelta(seconds=float(seconds)), group)
    return len(groups)


# Where a collective is run: an error raised inside these modules' frames is a failed collective.
_COLLECTIVE_MODULES = ("torch.distributed", "sglang.srt.distributed")


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed collective (a peer rank gone or silent), decided by its type and
    by where it was raised, never by its message: torch's ``DistError`` family, or a
    ``RuntimeError`` whose innermost frame is in torch.distributed or SGLang's communication
    layer. gloo needs the second rule: a silent or dead peer surfaces as a plain ``RuntimeError``
    raised from C++ under ``distributed_c10d`` ("Timed out waiting 5000ms for recv operation",
    "Connection closed by peer"; ``test_gloo_waits_for_a_stopped_peer_until_its_group_timeout``)."""
    import torch.distributed as dist

    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    if not isinstance(exc, RuntimeError) or exc.__traceback__ is None:
        return False
    tb = exc.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(tb.tb_frame.f_globals.get("__name__", "")).startswith(_COLLECTIVE_MODULES)


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


@contextlib.contextmanager
def no_pinning() -> Iterator[None]:
    """Context manager: ``Tensor.pin_memory`` returns the tensor itself while the engine runs
    on a GPU-less host; the original method is back on exit. A generator with ``try/finally``, not
    a class: an interrupt that lands as ``__exit__`` is called would skip a class's ``__exit__``
    body and leave torch patched for good, while here it is raised at the ``yield``, inside the
    ``try`` (tests/test_transactions.py delivers interrupts at every call)."""
    import torch

    if not pinning_unavailable():
        yield
        return
    if _pinning["depth"] == 0:
        _pinning["original"] = torch.Tensor.pin_memory
        torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
    _pinning["depth"] += 1
    try:
        yield
    finally:
        _pinning["depth"] -= 1
        if _pinning["depth"] == 0:
            torch.Tensor.pin_memory = _pinning["original"]


_pinning = {"depth": 0, "original": None}


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
    """0.5.23 keeps extend input ids on the CPU (``prefill_input_ids_cpu``, a ``ScheduleBatch``
    field that is None once moved) until the scheduler's overlap thread moves them; without that
    thread we move them ourselves."""
    cpu_ids = _require(batch, "prefill_input_ids_cpu", "a batch's extend input ids on the CPU")
    if _require(batch, "input_ids", "a batch's input ids") is None and cpu_ids is not None:
        batch.input_ids = batch.prefill_input_ids_cpu.to(batch.device)
        batch.prefill_input_ids_cpu = None


def lora_manager(model_runner):
    """SGLang's LoRA manager of a ModelRunner, or None when LoRA was not enabled (0.5.23 always
    sets ``ModelRunner.lora_manager``, to None when LoRA is off: a runner without the attribute
    raises instead of passing for "loaded with enable_lora=False")."""
    return _require(model_runner, "lora_manager", "the model runner's LoRA manager (None when LoRA is off)")


def lora_update_error(result) -> Optional[str]:
    """None when SGLang's LoRA load/unload result (``LoRAUpdateOutput``) says it succeeded, else
    its error message. A result without ``success`` raises: it must not pass for a success."""
    if _require(result, "success", "whether a LoRA load/unload succeeded"):
        return None
    return _require(result, "error_message", "why a LoRA load/unload failed") or "no reason given"


def lora_pool_buffers(manager) -> Tuple[dict, dict]:
    """``(A_buffer, B_buffer)`` of the LoRA memory pool: ``{module: [per-layer [slots, ...]]}``."""
    pool = _require(manager, "memory_pool", "the LoRA memory pool")
    return _require(pool, "A_buffer", "LoRA A buffers"), _require(pool, "B_buffer", "LoRA B buffers")


def lora_pool_slot(manager, lora_id: str) -> int:
    pool = _require(manager, "memory_pool", "the LoRA memory pool")
    return _require(pool, "get_buffer_id", "the LoRA pool's slot lookup")(lora_id)


def lora_base_layer(layer, adapter_active: bool = False):
    """The plain linear layer under SGLang's LoRA wrapper, or the layer itself when it is not
    wrapped (LoRA off). Wrapped or not is decided by type (``BaseLayerWithLoRA``), never by a
    missing attribute: a wrapper without ``base_layer`` raises, and so does an unwrapped layer
    while an adapter is active (``adapter_active``), whose delta would silently be dropped."""
    from sglang.srt.lora.layers import BaseLayerWithLoRA

    if isinstance(layer, BaseLayerWithLoRA):
        return _require(layer, "base_layer", "the linear layer under a LoRA wrapper")
    if adapter_active:
        raise SGLangLayoutError(
            f"SGLang internals changed: an adapter is active but {type(layer).__name__} is not wrapped by "
            "SGLang's LoRA layer (BaseLayerWithLoRA); this bridge supports sglang==0.5.23")
    return layer


def lora_layer_active(layer) -> bool:
    """Whether SGLang's LoRA wrapper ``layer`` adds adapter deltas in the current batch (False
    for an unwrapped layer, and for base-only batches: see :func:`skip_lora_on_base_batches`)."""
    from sglang.srt.lora.layers import BaseLayerWithLoRA

    if not isinstance(layer, BaseLayerWithLoRA):
        return False
    return bool(_require(layer, "lora_active", "a LoRA layer's per-batch switch"))


def lora_layer_buffers(layer, fused_qkv: bool):
    """The ``[slots, ...]`` A/B buffers a LoRA-wrapped linear layer reads in 0.5.23
    (``A_buffer_qkv``/``B_buffer_qkv`` on the fused QKV layer, ``A_buffer``/``B_buffer`` else).
    Raises instead of returning None: a missing buffer would silently drop LoRA deltas."""
    a, b = ("A_buffer_qkv", "B_buffer_qkv") if fused_qkv else ("A_buffer", "B_buffer")
    return _require(layer, a, "a LoRA layer's A buffer"), _require(layer, b, "a LoRA layer's B buffer")


def request_to_token_pool(model_runner):
    """The model runner's request-row pool (``ReqToTokenPool``: ``available_size``, ``free``)."""
    return _require(model_runner, "req_to_token_pool", "the model runner's request-row pool")


def kv_slot_allocator(model_runner):
    """The model runner's KV-slot allocator (``available_size``, ``free``)."""
    return _require(model_runner, "token_to_kv_pool_allocator", "the model runner's KV-slot allocator")


def release_batch_kv_slots(batch, allocator) -> None:
    """Give the KV slots a prepared ``ScheduleBatch`` holds (``out_cache_loc``) back to
    ``allocator``; idempotent. Taking them from the batch and freeing them happen with no call of
    this package in between, so an interrupt delivered at such a call cannot lose the slots."""
    loc = _require(batch, "out_cache_loc", "the KV slots of a batch")
    if loc is not None:
        batch.out_cache_loc = None
        allocator.free(loc)


def forward_outputs(runner_output):
    """What our model returned through ``ModelRunner.forward`` (a ``PassOutputs``; 0.5.23 passes
    the model's return value on unchanged as ``ModelRunnerOutput.logits_output``)."""
    from .sglang_models.forward_context import PassOutputs

    out = _require(runner_output, "logits_output", "the model output of ModelRunner.forward")
    if not isinstance(out, PassOutputs):
        raise SGLangLayoutError(
            f"SGLang internals changed: ModelRunnerOutput.logits_output is a {type(out).__name__}, not the "
            "PassOutputs the model returned; this bridge supports sglang==0.5.23")
    return out


def vocab_shard_range(embedding) -> Tuple[int, int]:
    """``[start, end)`` of the real vocabulary rows a ``VocabParallelEmbedding`` holds on this rank."""
    indices = _require(embedding, "shard_indices", "a vocab-parallel embedding's shard indices")
    return (_require(indices, "org_vocab_start_index", "a vocab shard's first row"),
            _require(indices, "org_vocab_end_index", "a vocab shard's end row"))


def parse_to_arguments(*args, **kwargs):
    """``(device, dtype, non_blocking, memory_format)`` as ``Tensor.to``/``Module.to`` read their
    arguments (torch's private ``torch._C._nn._parse_to``)."""
    import torch

    return _require(torch._C._nn, "_parse_to", "torch's .to() argument parser")(*args, **kwargs)


def default_process_group():
    """torch.distributed's default process group (torch's private ``_get_default_group``)."""
    import torch.distributed as dist

    c10d = _require(dist, "distributed_c10d", "torch.distributed's c10d module")
    return _require(c10d, "_get_default_group", "torch.distributed's default-group getter")()


def tensor_version(tensor) -> int:
    """PyTorch's in-place version counter of a tensor (shared by its views): how an in-place
    edit of an adapter view is noticed without hooks."""
    return _require(tensor, "_version", "torch's tensor version counter")


def skip_lora_on_base_batches(model_runner) -> None:
    """SGLang 0.5.23 runs its LoRA kernels on every batch once LoRA is enabled, also when no row
    has an adapter (each row then multiplies by an all-zero pool slot): a few percent on
    base-only batches, for nothing. Its LoRA backends carry a switch for exactly this case
    (``skip_inactive_lora_batches``, on for its UNO backend, off for torch_native/triton): with
    it, ``prepare_lora_batch`` resets the batch state when no row has an adapter and the LoRA
    layers take the base path. Batches with adapter rows are unchanged."""
    manager = lora_manager(model_runner)
    if manager is None:
        return
    backend = _require(manager, "lora_backend", "the LoRA manager's backend")
    _require(backend, "skip_inactive_lora_batches", "the LoRA backend's skip switch")
    backend.skip_inactive_lora_batches = True


def release_unread_kv_memory(model_runner) -> int:
    """SGLang 0.5.23 backs every KV-pool slot with memory (for roberta-base at 8,192 tokens in
    float32: 576 MiB, as much as the weights). With ``encoder_attention="sdpa"`` the model reads and
    writes none of it: attention runs on each pass's own q/k/v. The slots stay (SGLang's batch
    building assigns them; the pools' accounting is unchanged); each layer's K and V buffer becomes
    a tensor of the same shape on the ``meta`` device: no memory, writes go nowhere, and anything
    that read it would get a meta tensor and fail at its next real op instead of computing with
    stale numbers. Returns the bytes given back."""
    import torch

    pool = _require(model_runner, "token_to_kv_pool", "the model runner's KV pool")
    keys, values = _require(pool, "k_buffer", "the KV pool's key buffers"), _require(
        pool, "v_buffer", "the KV pool's value buffers")
    init_pointers = _require(pool, "_init_data_ptrs_and_strides", "the KV pool's pointer tables")
    if not isinstance(keys, list) or not isinstance(values, list) or not keys:
        raise SGLangLayoutError("SGLang internals changed: the KV pool's buffers are not per-layer lists")
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in keys + values}

    def unbacked(t: "torch.Tensor") -> "torch.Tensor":
        return torch.empty(t.shape, dtype=t.dtype, device="meta")

    pool.k_buffer, pool.v_buffer = [unbacked(t) for t in keys], [unbacked(t) for t in values]
    init_pointers()
    return sum(storages.values())


# --- the GEMM behind SGLang's linear layers (engine/gemm.py chooses it) ------------------------------
# SGLang 0.5.23's ``UnquantizedLinearMethod.apply`` ends in ``F.linear`` on CPU (its packed AMX
# kernel needs the sgl_kernel CPU build, absent here), and its LoRA layers call the same
# ``base_layer.quant_method.apply``. Routing a linear through another GEMM is a ``quant_method``
# whose ``apply`` calls it; only plain unquantized layers are routed, anything else fails loudly.
def onednn_linear_available() -> bool:
    import torch

    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_linear(x, weight, bias, activation: str = "none"):
    """oneDNN's linear on 2-D ``x`` (torch's private ``mkldnn._linear_pointwise``, the op
    torch.compile's CPU backend emits), reading ``weight`` as stored (nothing prepacked).
    ``activation="gelu"`` fuses the exact (erf) GELU into the product's epilogue."""
    import torch

    op = _require(torch.ops.mkldnn, "_linear_pointwise", "torch's oneDNN linear (mkldnn._linear_pointwise)")
    if activation == "gelu":
        return op(x, weight, bias, "gelu", [], "none")  # algorithm "none" = erf, "tanh" = the approximation
    return op(x, weight, bias, "none", [], "")


def onednn_pack_weight(weight):
    """``weight`` reordered once into the blocked layout oneDNN's linear computes from (torch's
    private ``mkldnn._reorder_linear_weight``, what torch.compile's CPU backend emits for frozen
    weights): an opaque oneDNN tensor ``onednn_linear`` takes in place of the weight, so the call
    no longer reorders (bfloat16) or runs its slower plain-layout kernel (float32, short inputs).
    A copy: it does not follow later writes to ``weight`` (engine/packed_weights.py keeps it in step)."""
    import torch

    op = _require(torch.ops.mkldnn, "_reorder_linear_weight", "torch's oneDNN weight reorder "
                  "(mkldnn._reorder_linear_weight)")
    return op(weight.detach(), None)  # None: no batch-size hint -- one layout for every row count


def route_linear_layers(model, linear) -> int:
    """Make every SGLang linear layer of ``model`` compute ``linear(x, weight, bias)``; returns how
    many layers were routed. Refuses a layer whose method is not SGLang's plain unquantized one."""
    from sglang.srt.layers.linear import LinearBase
    from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod

    class RoutedLinearMethod(UnquantizedLinearMethod):
        routed_by_bridge = True

        def apply(self, layer, x, bias=None):
            return linear(x, layer.weight, bias)

    routed = 0
    for name, module in model.named_modules():
        if not isinstance(module, LinearBase):
            continue
        method = _require(module, "quant_method", f"{name}'s linear method")
        if type(method) is not UnquantizedLinearMethod and not getattr(method, "routed_by_bridge", False):
            raise SGLangLayoutError(f"SGLang internals changed: {name} computes through {type(method).__name__}, "
                                    "not the unquantized linear method this bridge routes")
        module.quant_method = RoutedLinearMethod()
        routed += 1
    return routed


# --- SGLang's world beside another default process group (data-parallel launches) ------------------
# SGLang 0.5.23 builds its parallel runtime on torch.distributed's DEFAULT process group:
# ``parallel_state.init_distributed_environment`` calls ``init_process_group`` only when no default
# group exists; when one exists (torchrun/accelerate's N-process world, built by the Trainer's
# ``PartialState``) it takes that world as its own and ``initialize_model_parallel`` raises
# "world_size (N) is not equal to tensor_model_parallel_size (1) x pipeline_model_parallel_size (1)".
# The other way round (engine loaded first) SGLang's 1-process world is the default and accelerate
# adopts it: every rank believes it is rank 0 of 1 and trains alone. torch keeps ONE default group
# per process, so the two worlds coexist like this: the launcher's world is the default (the
# Trainer, its samplers, gathers and barriers need nothing else), and SGLang's world is an ordinary
# group next to it. SGLang reaches its world only through the groups it built (coordinators keep
# their rank and groups; collectives name their group), except while it builds them and when it
# tears them down -- the two places patched here.
_sglang_world: Dict[str, object] = {"pg": None, "installed": False}


def _c10d_world():
    import torch.distributed.distributed_c10d as c10d

    world = _require(c10d, "_world", "torch.distributed's registry of process groups")
    _require(world, "default_pg", "torch.distributed's default-group slot")
    return c10d, world


def _set_default_group(pg) -> None:
    c10d, _ = _c10d_world()
    _require(c10d, "_update_default_pg", "torch.distributed's default-group setter")(pg)


_ASIDE_PREFIX = "launcher/"


def _rename_groups_aside() -> None:
    """torch names a process group after a per-process counter (``_world.group_count``: "0" for the
    default group, then "1", ... or a hash of the ranks and the counter) and its ranks meet under
    that name in the store; two groups of one process may not share a name. SGLang's TP workers
    are fresh processes, so their groups are named from 0 while this process's counter has moved
    on with the launcher's groups: rank 0 would wait under other names forever. So the groups that
    exist here (the launcher's, already built: the name no longer matters to them) take a prefixed
    name, and SGLang's build starts from 0 like its workers'."""
    c10d, world = _c10d_world()
    unregister = _require(c10d, "_unregister_process_group", "torch's process-group name registry")
    register = _require(c10d, "_register_process_group", "torch's process-group name registry")
    for pg, name in list(world.pg_names.items()):
        if name.startswith(_ASIDE_PREFIX) or pg is _sglang_world["pg"]:
            continue
        unregister(name)
        new = _ASIDE_PREFIX + name
        _require(pg, "_set_group_name", "a process group's name setter")(new)
        world.pg_names[pg] = new
        register(new, pg)


def sglang_world_is_default() -> bool:
    """Whether this process's default process group is the world an engine of ours built."""
    import torch.distributed as dist

    return dist.is_initialized() and _parallel_users["count"] > 0 and _sglang_world["pg"] is None


def set_aside_sglang_world() -> bool:
    """Take SGLang's world out of the default slot (it stays alive for SGLang's own groups and is
    destroyed when the last engine closes) so that a launcher's world can become the default.
    Returns whether it was the default. Needs :func:`install_world_beside_default`."""
    if not sglang_world_is_default():
        return False
    _, world = _c10d_world()
    _sglang_world["pg"] = world.default_pg
    _set_default_group(None)
    return True


def install_world_beside_default() -> None:
    """Let SGLang build and destroy its world while another default process group exists
    (idempotent). ``bootstrap.init_parallel_runtime`` runs with the default slot empty, so SGLang
    creates its own world and groups; the other default is put back right after.
    ``parallel_state.destroy_distributed_environment`` destroys SGLang's world as the ordinary
    group it then is, not the default one (``destroy_process_group()`` would tear down every
    group of the process, the launcher's included). Without another default group both behave
    exactly as in SGLang."""
    if _sglang_world["installed"]:
        return
    from sglang.srt.distributed import bootstrap, parallel_state

    original_init = _require(bootstrap, "init_parallel_runtime", "SGLang's parallel-runtime builder")
    original_destroy = _require(parallel_state, "destroy_distributed_environment", "SGLang's world teardown")
    _require(parallel_state, "_WORLD", "SGLang's world coordinator")

    def init_parallel_runtime(*args, **kwargs):
        _, world = _c10d_world()
        other = world.default_pg
        if other is None:
            return original_init(*args, **kwargs)
        _rename_groups_aside()
        count = world.group_count
        _set_default_group(None)
        world.group_count = 0  # SGLang's groups get the names they get in its (fresh) TP workers
        try:
            return original_init(*args, **kwargs)
        finally:
            _sglang_world["pg"] = world.default_pg  # None if SGLang failed before building it
            _set_default_group(other)
            world.group_count = max(count, world.group_count)  # the same on every launched process

    def destroy_distributed_environment():
        import torch.distributed as dist

        own = _sglang_world["pg"]
        if own is None:
            return original_destroy()
        _sglang_world["pg"] = None
        coordinator = parallel_state._WORLD
        parallel_state._WORLD = None
        parallel_state._MODEL_PARALLEL_GROUP_TIMEOUT = None
        if coordinator is not None:
            coordinator.destroy()
        dist.destroy_process_group(own)

    init_parallel_runtime.original = original_init
    destroy_distributed_environment.original = original_destroy
    bootstrap.init_parallel_runtime = init_parallel_runtime
    parallel_state.destroy_distributed_environment = destroy_distributed_environment
    _sglang_world["installed"] = True
