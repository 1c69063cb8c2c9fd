"""Entry point of a tensor-parallel worker process:
``python -m sglang_hf_bridge.engine.tp_worker HOST:PORT RANK [--local]``.

Rank 0 starts its own node's workers with ``--local`` (key and spawn token on stdin). On another
node, start one per rank by hand (a follower), with the shared key (hex) on the first line of
stdin, or in ``SGLANG_HF_BRIDGE_TP_AUTHKEY`` (read once; see docs/tensor-parallel.md).
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from multiprocessing.connection import Client
from typing import Any, Optional, Tuple

from sglang_hf_bridge.engine.config import AUTHKEY_ENV, EngineConfig
from sglang_hf_bridge.engine.rank import RankEngine, warm_up_then_bound_collectives
from sglang_hf_bridge.engine.wire import receive_message, send_message
from sglang_hf_bridge.process import interface_of_address, resolve_qualified_name, set_parent_death_signal

# How long a follower keeps trying to reach rank 0 (it may start first); a local worker: 60 s.
FOLLOWER_CONNECT_TIMEOUT_S = 600


def worker_entry() -> None:
    """``python -m sglang_hf_bridge.engine.tp_worker HOST:PORT RANK [--local]``.

    A follower on another node takes the shared authkey (hex) from the environment variable named
    by ``AUTHKEY_ENV`` -- read once and removed from ``os.environ``, though ``/proc/PID/environ``
    keeps showing it -- or, when that is unset, from the first line of stdin. Local workers
    (``--local``) read the key and their spawn token from stdin and die with rank 0."""
    args = [a for a in sys.argv[1:] if a != "--local"]
    local = len(args) < len(sys.argv) - 1
    address, rank = args[0], int(args[1])
    host, _, port = address.rpartition(":")
    if local or not host:
        set_parent_death_signal()  # a local worker dies with rank 0's process
    authkey, token = _read_secret(local)
    deadline = time.monotonic() + (FOLLOWER_CONNECT_TIMEOUT_S if not local else 60)
    while True:  # a follower may start before rank 0 listens
        try:
            conn = Client((host or "127.0.0.1", int(port)), authkey=authkey)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    send_message(conn, ("hello", rank, token))
    config, dist_port, rendezvous = receive_message(conn)
    if rendezvous.gloo_interface is None and rendezvous.init_method is None:  # a follower: gloo binds
        from sglang_hf_bridge import compat  # where this node reaches rank 0, unless the user named an interface

        rendezvous.gloo_interface = os.environ.get(compat.GLOO_INTERFACE_ENV) or _local_interface(conn)
    _serve(config, rank, dist_port, conn, rendezvous)


def _read_secret(local: bool) -> Tuple[bytes, Optional[str]]:
    if not local and AUTHKEY_ENV in os.environ:
        return bytes.fromhex(os.environ.pop(AUTHKEY_ENV)), None
    key = sys.stdin.readline().strip()
    token = sys.stdin.readline().strip() if local else ""
    if not key:
        raise SystemExit(f"tp_worker: no authkey ({AUTHKEY_ENV} is unset and stdin gave none)")
    return bytes.fromhex(key), token or None


def _local_interface(conn) -> Optional[str]:
    with socket.socket(fileno=os.dup(conn.fileno())) as s:
        return interface_of_address(s.getsockname()[0])


def _serve(config: EngineConfig, rank: int, dist_port: int, conn, rendezvous) -> None:
    import dataclasses

    config = dataclasses.replace(config, node_rank=rank // config.ranks_per_node)
    try:
        from sglang_hf_bridge import compat, log_control
        from sglang_hf_bridge.checkpoint import CheckpointFiles, iter_engine_tensors, locate_checkpoint

        compat.configure_sglang_environment()
        if config.device == "cpu":
            os.environ.update(compat.cpu_tensor_parallel_environment(config.tp_size))
        compat.register_rendezvous(dist_port, rendezvous)
        # The files rank 0 resolved (the same Hub snapshot); a config without them reads model_path.
        checkpoint = (CheckpointFiles(config.model_path, list(config.weight_files), config.weight_format)
                      if config.weight_files else locate_checkpoint(config.model_path))
        missing = [f for f in (*checkpoint.weight_files, *config.extra_weight_files) if not os.path.isfile(f)]
        if missing:  # fail before the ranks meet, not at the first read after the rendezvous
            raise FileNotFoundError(f"rank {rank} cannot see the checkpoint files rank 0 resolved: {missing[:3]}")
        with log_control.quiet_sglang():
            import sglang.srt.model_executor.model_runner  # noqa: F401 - the long import, before the ranks meet

            send_message(conn, ("prepared", None))
            engine: Optional[RankEngine] = RankEngine(config, rank=rank, dist_port=dist_port)
            engine.start(iter_engine_tensors(checkpoint, config.skip_tensors, config.extra_weight_files))
            warm_up_then_bound_collectives(engine)
        send_message(conn, ("ready", None))
    except BaseException:  # noqa: BLE001 - report to rank 0, then exit
        try:
            send_message(conn, ("error", traceback.format_exc()))
        except OSError:
            pass
        return
    while True:
        try:
            op, args = receive_message(conn)
        except (EOFError, OSError):  # rank 0 is gone
            break
        try:
            if op == "close":
                engine.close()
                send_message(conn, ("ok", None))
                break
            try:
                reply = ("ok", _run_call(engine, *args))
            except BaseException:  # noqa: BLE001
                reply = ("error", traceback.format_exc())
            send_message(conn, reply)
        except OSError:  # rank 0 is gone
            break
    os._exit(0)


def _run_call(engine, path: str, args: tuple, gather: bool) -> Any:
    """One rank operation, the same on every rank; only declared rank operations run."""
    if not path.startswith("sglang_hf_bridge."):
        raise ValueError(f"workers only run sglang_hf_bridge rank operations, not {path!r}")
    fn = resolve_qualified_name(path)
    if not getattr(fn, "declares_effect", False):
        raise ValueError(f"{path!r} is not a declared rank operation (see engine.versions.writes)")
    try:
        result = fn(engine, *args)
    finally:
        engine.after_operation(fn, args)
    return result if gather else None


if __name__ == "__main__":
    worker_entry()
