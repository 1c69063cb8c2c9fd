"""Tensor-parallel ranks 1..N-1: worker processes that run a :class:`~.rank.RankEngine` each and
execute rank operations sent by rank 0, in lockstep (SGLang's parallel layers meet in
collectives: gloo on CPU, NCCL on CUDA).

Local workers are plain subprocesses (``python -m sglang_hf_bridge.engine.tp_worker``) rather than
multiprocessing children, so user scripts need no ``if __name__ == "__main__"`` guard. They die
with the user's process (parent-death signal plus a connection that closes), and a dead worker is
reported at the next call instead of hanging in a collective. On other nodes the user starts the
same command per rank (a "follower") pointing at rank 0's command address, with the shared
authkey. Operations travel as ``module.qualname`` of a declared rank operation, never as code.
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
from typing import Any, Callable, List, Optional

from ..errors import WorkerError
from ..process import qualified_name, resolve_qualified_name, set_parent_death_signal
from .config import AUTHKEY_ENV, EngineConfig

WORKER_START_TIMEOUT_S = 600
WORKER_REPLY_TIMEOUT_S = 30


def _send(conn, obj) -> None:
    # Plain pickle (tensors copied as bytes): multiprocessing's pickler would pass tensor storage
    # through file descriptors, which needs multiprocessing-managed processes.
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn):
    return pickle.loads(conn.recv_bytes())


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


class WorkerGroup:
    """Ranks 1..tp_size-1 as seen from rank 0; empty (every method a no-op) at tp_size 1."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.procs: List[Any] = []  # subprocess.Popen, or _RemoteRank for other nodes' ranks
        self.conns: List[Any] = []

    def __len__(self) -> int:
        return len(self.conns)

    # ------------------------------------------------------------------ start-up
    def launch(self, dist_port: int) -> None:
        """Spawn this node's workers, accept every rank's connection, send each the config."""
        cfg = self.config
        if cfg.tp_size == 1:
            return
        from .. import compat

        if cfg.device == "cpu":
            os.environ.update(compat.cpu_tensor_parallel_environment(cfg.tp_size))
        authkey, listen = self._command_address()
        env = dict(os.environ, **{AUTHKEY_ENV: authkey.hex()})
        with Listener(listen, authkey=authkey) as listener:
            for rank in range(1, cfg.ranks_per_node):
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "sglang_hf_bridge.engine.tp_worker", str(listener.address[1]), str(rank)],
                    env=env))
            by_rank = {}
            while len(by_rank) < cfg.tp_size - 1:
                conn = listener.accept()
                _, rank = _recv(conn)
                by_rank[rank] = conn
        local = list(self.procs)
        self.procs = [local[r - 1] if r < cfg.ranks_per_node else _RemoteRank(r) for r in sorted(by_rank)]
        self.conns = [by_rank[r] for r in sorted(by_rank)]
        for conn in self.conns:
            _send(conn, (cfg, dist_port))

    def _command_address(self):
        cfg = self.config
        if cfg.nnodes == 1:
            return secrets.token_bytes(32), ("127.0.0.1", 0)
        # Followers on other nodes connect to rank 0's command address with a shared authkey.
        if not cfg.dist_init_addr or AUTHKEY_ENV not in os.environ:
            raise ValueError(f"multi-node TP needs dist_init_addr='HOST:PORT' and the shared authkey in "
                             f"{AUTHKEY_ENV} (hex) on every node")
        host, _, port = cfg.dist_init_addr.rpartition(":")
        return bytes.fromhex(os.environ[AUTHKEY_ENV]), (host, int(port) + 1)

    def wait_ready(self) -> None:
        self.receive(timeout=WORKER_START_TIMEOUT_S)

    # ------------------------------------------------------------------ calls
    def check_alive(self) -> None:
        for rank, p in enumerate(self.procs, start=1):
            if p.poll() is not None:
                raise WorkerError(
                    f"tensor-parallel worker rank {rank} (pid {p.pid}) died with exit code {p.returncode}; "
                    "close() this model and load it again"
                )

    def send_call(self, fn: Callable[..., Any], args: tuple, gather: bool = True) -> None:
        if not self.conns:
            return
        self.check_alive()
        message = ("call", (qualified_name(fn), args, gather))
        for c in self.conns:
            _send(c, message)

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


# ---------------------------------------------------------------------- the worker side
def worker_entry() -> None:
    """``python -m sglang_hf_bridge.engine.tp_worker [HOST:]PORT RANK`` (authkey in the
    environment variable named by ``AUTHKEY_ENV``, hex; removed from the environment at once)."""
    address, rank = sys.argv[1], int(sys.argv[2])
    host, _, port = address.rpartition(":")
    if not host:
        set_parent_death_signal()  # a local worker dies with rank 0's process
    authkey = bytes.fromhex(os.environ.pop(AUTHKEY_ENV))
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
    config, dist_port = _recv(conn)
    _serve(config, rank, dist_port, conn)


def _serve(config: EngineConfig, rank: int, dist_port: int, conn) -> None:
    import dataclasses

    config = dataclasses.replace(config, node_rank=rank // config.ranks_per_node)
    try:
        from .. import compat, log_control
        from ..checkpoint import iter_checkpoint_tensors, locate_checkpoint
        from .rank import RankEngine

        compat.configure_sglang_environment()
        if config.device == "cpu":
            os.environ.update(compat.cpu_tensor_parallel_environment(config.tp_size))
        with log_control.quiet_sglang():
            engine: Optional[RankEngine] = RankEngine(config, rank=rank, dist_port=dist_port)
            engine.start(iter_checkpoint_tensors(locate_checkpoint(config.model_path)))
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
            engine.close()
            _send(conn, ("ok", None))
            break
        try:
            _send(conn, ("ok", _run_call(engine, *args)))
        except BaseException:  # noqa: BLE001
            _send(conn, ("error", traceback.format_exc()))
    os._exit(0)


def _run_call(engine, path: str, args: tuple, gather: bool) -> Any:
    """One rank operation, the same on every rank; only declared rank operations run."""
    if not path.startswith("sglang_hf_bridge."):
        raise ValueError(f"workers only run sglang_hf_bridge rank operations, not {path!r}")
    fn = resolve_qualified_name(path)
    if not hasattr(fn, "weight_effect"):
        raise ValueError(f"{path!r} is not a declared rank operation (see engine.versions.writes)")
    result = fn(engine, *args)
    return result if gather else None
