"""Tensor parallelism: the user's process is rank 0, ranks 1..N-1 are spawned worker processes.

Every engine operation (forward, adapter load/unload, weight reads) is sent to the workers and
run on all ranks in lockstep, because SGLang's parallel layers meet in collectives (gloo on CPU,
NCCL on CUDA). Only rank 0's results are used. Workers die with the user's process (parent-death
signal plus a pipe that closes), and a dead worker is reported at the next call instead of
hanging in a collective.
"""

from __future__ import annotations

import os
import pickle
import secrets
import subprocess
import sys
import time
import traceback
from multiprocessing.connection import Client, Listener
from typing import Any, Dict, List, Optional

from .. import compat
from .config import EngineConfig
from .caching import EngineCaches
from .runtime import EncoderRuntime, call_by_path, resolve_path
from .versions import apply_effect

WORKER_START_TIMEOUT_S = 600


def _send(conn, obj) -> None:
    # Plain pickle (tensors copied as bytes): multiprocessing's pickler would pass tensor storage
    # through file descriptors, which needs multiprocessing-managed processes.
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn):
    return pickle.loads(conn.recv_bytes())
WORKER_REPLY_TIMEOUT_S = 30


class WorkerError(RuntimeError):
    """A tensor-parallel worker process died or failed."""


def worker_entry() -> None:
    """``python -m sglang_hf_bridge.engine.tp_worker [HOST:]PORT RANK`` (authkey in the
    environment variable SGLANG_HF_BRIDGE_TP_AUTHKEY, hex).

    Local workers are plain subprocesses rather than multiprocessing children, so user scripts
    need no ``if __name__ == "__main__"`` guard (spawn would re-import them). On another node the
    user starts the same command for each of that node's ranks (a "follower"), pointing at rank
    0's command address and sharing the authkey."""
    address, rank = sys.argv[1], int(sys.argv[2])
    host, _, port = address.rpartition(":")
    if not host:
        compat.set_parent_death_signal()  # a local worker dies with rank 0's process
    authkey = bytes.fromhex(os.environ.pop("SGLANG_HF_BRIDGE_TP_AUTHKEY"))
    deadline = time.monotonic() + (WORKER_START_TIMEOUT_S if host else 60)
    while True:  # a follower may start before rank 0 listens
        try:
            conn = Client((host or "127.0.0.1", int(port)), authkey=authkey)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    _send(conn, ("hello", rank))
    config, model_class_path, checkpoint_dir, dist_port = _recv(conn)
    _worker_main(config, model_class_path, checkpoint_dir, rank, dist_port, conn)


def _worker_main(config: EngineConfig, model_class_path: str, checkpoint_dir: str, rank: int, port: int, conn) -> None:
    import dataclasses

    config = dataclasses.replace(config, node_rank=rank // max(1, config.tp_size // config.nnodes))
    os.environ.update(compat.cpu_tensor_parallel_environment(config.tp_size) if config.device == "cpu" else {})
    try:
        import importlib

        import sglang_hf_bridge  # noqa: F401  (SGLang environment, quiet imports)
        from .. import log_control
        from ..modeling.checkpoint import iter_checkpoint_tensors, locate_checkpoint

        module_name, cls_name = model_class_path.rsplit(".", 1)
        model_class = getattr(importlib.import_module(module_name), cls_name)
        with log_control.quiet_sglang():
            runtime = EncoderRuntime(config, model_class, rank=rank, dist_port=port)
            runtime.start(iter_checkpoint_tensors(locate_checkpoint(checkpoint_dir)))
        _send(conn, ("ready", None))
    except BaseException:  # noqa: BLE001 - report to rank 0, then exit
        _send(conn, ("error", traceback.format_exc()))
        return
    while True:
        try:
            op, args = _recv(conn)
        except (EOFError, OSError):  # rank 0 is gone
            break
        if op == "close":
            runtime.close()
            _send(conn, ("ok", None))
            break
        try:
            _send(conn, ("ok", _run_op(runtime, op, args)))
        except BaseException:  # noqa: BLE001
            _send(conn, ("error", traceback.format_exc()))
    os._exit(0)


def _run_op(runtime: EncoderRuntime, op: str, args: tuple) -> Any:
    """One engine operation, the same on every rank."""
    if op == "forward":
        runtime.forward_on_rank(*args)
        return None
    if op == "adapter_load":
        runtime.adapters.load(*args)
        return None
    if op == "adapter_unload":
        runtime.adapters.unload(*args)
        return None
    if op == "named_parameters":
        return {n: p.detach().cpu().clone() for n, p in runtime.model.named_parameters()}
    if op == "call":  # a function of (runtime, *args), importable by name
        path, fn_args = args
        if not path.startswith("sglang_hf_bridge."):
            raise ValueError(f"workers only run sglang_hf_bridge operations, not {path!r}")
        return call_by_path(path, runtime, *fn_args)
    raise ValueError(f"unknown worker op {op!r}")


class _RemoteRank:
    """Stands in for a Popen of a rank that runs on another node (its liveness is its socket)."""

    def __init__(self, rank: int):
        self.rank, self.pid, self.returncode = rank, None, None

    def poll(self):
        return self.returncode

    def kill(self):
        pass

    def wait(self, timeout=None):
        return self.returncode


class _Workers:
    def __init__(self):
        self.procs: List[subprocess.Popen] = []
        self.conns = []

    def check_alive(self) -> None:
        for rank, p in enumerate(self.procs, start=1):
            if p.poll() is not None:
                raise WorkerError(
                    f"tensor-parallel worker rank {rank} (pid {p.pid}) died with exit code {p.returncode}; "
                    "close() this model and load it again"
                )

    def send(self, op: str, args: tuple = ()) -> None:
        self.check_alive()
        for c in self.conns:
            _send(c, (op, args))

    def receive(self, timeout: float = WORKER_REPLY_TIMEOUT_S) -> List[Any]:
        out = []
        for rank, (c, p) in enumerate(zip(self.conns, self.procs), start=1):
            waited = 0.0
            while not c.poll(1.0):
                waited += 1.0
                if p.poll() is not None or waited >= timeout:
                    raise WorkerError(
                        f"tensor-parallel worker rank {rank} "
                        + ("died" if p.poll() is not None else f"did not answer within {timeout:.0f} s")
                    )
            status, value = _recv(c)
            if status == "error":
                raise WorkerError(f"tensor-parallel worker rank {rank} failed:\n{value}")
            out.append(value)
        return out

    def stop(self) -> None:
        for c, p in zip(self.conns, self.procs):
            try:
                if p.poll() is None:
                    _send(c, ("close", ()))
            except (OSError, BrokenPipeError):
                pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        for c in self.conns:
            c.close()
        self.procs, self.conns = [], []


class TensorParallelRuntime:
    """Rank 0's runtime plus workers; the same interface as :class:`EncoderRuntime`."""

    def __init__(self, config: EngineConfig, model_class, checkpoint_dir: str):
        self.config = config
        self.model_class = model_class
        self.checkpoint_dir = checkpoint_dir
        self.local: Optional[EncoderRuntime] = None
        self.workers = _Workers()
        self._adapters = None
        self.caches = EngineCaches(self)

    def start(self, weights) -> "TensorParallelRuntime":
        cfg = self.config
        compat.check_parallel_runtime_available(cfg.device, cfg.tp_size)
        if cfg.device == "cpu":
            os.environ.update(compat.cpu_tensor_parallel_environment(cfg.tp_size))
        port = compat.free_local_port()
        path = f"{self.model_class.__module__}.{self.model_class.__qualname__}"
        local_ranks = cfg.tp_size // cfg.nnodes
        if cfg.nnodes > 1:
            # Followers on other nodes connect to rank 0's command address with a shared authkey.
            if not cfg.dist_init_addr or "SGLANG_HF_BRIDGE_TP_AUTHKEY" not in os.environ:
                raise ValueError("multi-node TP needs dist_init_addr='HOST:PORT' and the shared authkey in "
                                 "SGLANG_HF_BRIDGE_TP_AUTHKEY (hex) on every node")
            host, _, dport = cfg.dist_init_addr.rpartition(":")
            authkey = bytes.fromhex(os.environ["SGLANG_HF_BRIDGE_TP_AUTHKEY"])
            listen = (host, int(dport) + 1)
        else:
            authkey, listen = secrets.token_bytes(32), ("127.0.0.1", 0)
        env = dict(os.environ, SGLANG_HF_BRIDGE_TP_AUTHKEY=authkey.hex())
        try:
            with Listener(listen, authkey=authkey) as listener:
                for rank in range(1, local_ranks):
                    self.workers.procs.append(subprocess.Popen(
                        [sys.executable, "-m", "sglang_hf_bridge.engine.tp_worker", str(listener.address[1]), str(rank)],
                        env=env))
                by_rank = {}
                while len(by_rank) < cfg.tp_size - 1:
                    conn = listener.accept()
                    _, rank = _recv(conn)
                    by_rank[rank] = conn
                local = list(self.workers.procs)
                self.workers.procs = [local[r - 1] if r < local_ranks else _RemoteRank(r) for r in sorted(by_rank)]
                self.workers.conns = [by_rank[r] for r in sorted(by_rank)]
                for conn in self.workers.conns:
                    _send(conn, (cfg, path, self.checkpoint_dir, port))
        except BaseException:
            self.close()
            raise
        try:
            self.local = EncoderRuntime(cfg, self.model_class, rank=0, dist_port=port)
            self.local.start(weights)
            self.workers.receive(timeout=WORKER_START_TIMEOUT_S)
        except BaseException:
            self.close()
            raise
        self.initial_pool_stats = self.local.initial_pool_stats
        return self

    # --- the EncoderRuntime surface ----------------------------------------------------------
    @property
    def started(self) -> bool:
        return self.local is not None and self.local.started

    @property
    def model(self):
        return self.local.model

    @property
    def model_runner(self):
        return self.local.model_runner

    def pool_stats(self) -> Dict[str, int]:
        return self.local.pool_stats()

    def forward(self, call):
        """The caches decide once, here; every rank then runs the same reduced call."""
        self.local._runner()
        return self.caches.forward(call, self._forward_all_ranks)

    def _forward_all_ranks(self, call):
        self.workers.send("forward", (call,))
        result = self.local.forward_on_rank(call)
        self.workers.receive()
        return result

    def run_on_all_ranks(self, function_path: str, *args) -> List[Any]:
        """Call ``function(runtime, *args)`` on every rank in lockstep; returns every rank's result."""
        function = resolve_path(function_path)
        try:
            self.workers.send("call", (function_path, args))
            mine = function(self.local, *args)
            return [mine] + self.workers.receive()
        finally:
            apply_effect(self.caches.versions, function, args)

    def rank_parameters(self) -> List[Dict[str, Any]]:
        """Every rank's engine parameters (its shards), rank 0 first."""
        self.workers.send("named_parameters")
        mine = {n: p.detach().cpu().clone() for n, p in self.local.model.named_parameters()}
        return [mine] + self.workers.receive()

    @property
    def adapters(self):
        if self._adapters is None:
            self._adapters = _TPAdapters(self)
        return self._adapters

    def _query_only_lora(self, lora_ids, device):
        return self.local._query_only_lora(lora_ids, device)

    def close(self) -> None:
        self.caches.drop_all()
        self.workers.stop()
        if self.local is not None:
            self.local.close()


class _TPAdapters:
    """Adapter pool operations mirrored on every rank (same lora_id everywhere)."""

    def __init__(self, tp: TensorParallelRuntime):
        self.tp = tp

    @property
    def adapters(self):
        return self.tp.local.adapters.adapters

    def load(self, name, weights, rank, scaling, lora_id=None):
        import uuid

        lora_id = lora_id or uuid.uuid4().hex
        self.tp.caches.versions.bump_adapter(lora_id)
        self.tp.workers.send("adapter_load", (name, weights, rank, scaling, lora_id))
        adapter = self.tp.local.adapters.load(name, weights, rank, scaling, lora_id)
        self.tp.workers.receive()
        return adapter

    def unload(self, lora_id):
        self.tp.caches.versions.bump_adapter(lora_id)
        self.tp.workers.send("adapter_unload", (lora_id,))
        self.tp.local.adapters.unload(lora_id)
        self.tp.workers.receive()

    def slot_of(self, lora_id):
        return self.tp.local.adapters.slot_of(lora_id)
