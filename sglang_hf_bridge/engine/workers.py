"""Tensor-parallel ranks 1..N-1: worker processes that run a :class:`~.rank.RankEngine` each and
execute rank operations sent by rank 0, in lockstep (SGLang's parallel layers meet in
collectives: gloo on CPU, NCCL on CUDA).

Local workers are plain subprocesses (``python -m sglang_hf_bridge.engine.tp_worker``, the worker
side of this module's protocol; the framing both ends share is ``wire.py``) rather than
multiprocessing children, so user scripts need no ``if __name__ == "__main__"`` guard. They die
with the user's process (parent-death signal plus a connection that closes). On other nodes the
user starts the same command per rank (a "follower") pointing at rank 0's command address, with
the shared authkey. Operations travel as ``module.qualname`` of a declared rank operation, never
as code.

Reachability: on one node every socket binds to loopback (the command listener here; the
rendezvous is a file and gloo binds ``lo``, see :class:`~sglang_hf_bridge.compat.Rendezvous`).
The command listener admits only a peer that answers the authkey challenge and then names a rank
still missing; local workers get their one-time key on stdin (never on the command line or in
their environment). Each connection has its own deadline, so a silent or garbage client is
dropped without delaying the real workers.

Hangs: nothing rank 0 waits for is unbounded. A reply, a send, a start-up handshake and (once the
engine runs) every collective give up after ``worker_timeout_s``; the call then raises
:class:`~sglang_hf_bridge.errors.WorkerError` naming the rank (dead, stopped, or silent), the
group is marked unusable, and ``close()`` kills what is left.
"""

from __future__ import annotations

import hmac
import os
import pickle
import secrets
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..errors import WorkerError
from ..process import (
    interface_of_address,
    process_state,
    qualified_name,
)
from .config import AUTHKEY_ENV, EngineConfig
from .rank import RankEngine, warm_up_then_bound_collectives
from .wire import MAX_PENDING_HANDSHAKES, bound_socket_waits, listening_socket, receive_message, send_message

# How long close() lets healthy workers shut down on their own before killing them.
CLOSE_GRACE_S = 10.0


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


class _Handshake(threading.Thread):
    """One start-up connection: the authkey challenge both ways, then the worker's hello
    ``("hello", rank, token)``. Runs beside the accept loop, which shuts the socket down when the
    connection's deadline passes (a silent client then reads EOF here and is dropped)."""

    def __init__(self, sock: socket.socket, authkey: bytes, deadline: float):
        super().__init__(name="sglang-hf-bridge-tp-handshake", daemon=True)
        self.sock, self.authkey, self.deadline = sock, authkey, deadline
        self.conn = Connection(os.dup(sock.fileno()))
        self.hello: Optional[Tuple[int, Optional[str]]] = None
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            deliver_challenge(self.conn, self.authkey)  # wrong key / garbage: AuthenticationError, OSError
            answer_challenge(self.conn, self.authkey)
            msg = receive_message(self.conn)  # only an authenticated peer gets this far
            if not (isinstance(msg, tuple) and len(msg) == 3 and msg[0] == "hello" and type(msg[1]) is int
                    and (msg[2] is None or isinstance(msg[2], str))):
                raise ValueError(f"not a worker hello: {type(msg).__name__}")
            self.hello = (msg[1], msg[2])
        except BaseException as e:  # noqa: BLE001 - one bad client must not end the accept loop
            self.error = e

    def abort(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def drop(self) -> None:
        self.abort()
        self.conn.close()
        self.sock.close()


class WorkerGroup:
    """Ranks 1..tp_size-1 as seen from rank 0; empty (every method a no-op) at tp_size 1."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.procs: List[Any] = []  # subprocess.Popen, or _RemoteRank for other nodes' ranks
        self.conns: List[Any] = []
        self.timeout_s = float(config.worker_timeout_s)
        self.command_address: Optional[Tuple[str, int]] = None  # while start-up connections are accepted
        self._dist_port: Optional[int] = None
        self._broken: Optional[str] = None  # why the group cannot be used any more
        self._outstanding = False  # a call was sent whose replies were not read yet

    def __len__(self) -> int:
        return len(self.conns)

    # ------------------------------------------------------------------ start-up
    def rank0_engine(self, dist_port: int) -> RankEngine:
        """The engine of rank 0 (this process): a plain :class:`RankEngine` at tp_size 1, else one
        whose failures this group explains (:class:`Rank0Engine`)."""
        if self.config.tp_size == 1:
            return RankEngine(self.config, rank=0, dist_port=dist_port)
        return Rank0Engine(self, dist_port)

    def launch(self, dist_port: int) -> None:
        """Spawn this node's workers, accept every rank's connection, send each the config."""
        cfg = self.config
        if cfg.tp_size == 1:
            return
        from .. import compat

        if cfg.device == "cpu":
            os.environ.update(compat.cpu_tensor_parallel_environment(cfg.tp_size))
        authkey, address = self._command_address()
        self._dist_port = dist_port
        rendezvous = self._rendezvous()
        compat.register_rendezvous(dist_port, rendezvous)  # rank 0's own engine meets the others there
        token = secrets.token_hex(16)  # proves a connection is one of the workers spawned here
        deadline = time.monotonic() + cfg.start_timeout_s
        with listening_socket(address) as server:
            self.command_address = server.getsockname()[:2]
            self._spawn_local_workers(authkey, token)
            try:
                by_rank = self._accept(server, authkey, token, deadline)
            finally:
                self.command_address = None
        local = list(self.procs)
        ranks = sorted(by_rank)
        self.procs = [local[r - 1] if r < cfg.ranks_per_node else _RemoteRank(r) for r in ranks]
        self.conns = [by_rank[r] for r in ranks]
        for r, conn in zip(ranks, self.conns):
            send_message(conn, (cfg, dist_port, rendezvous.for_worker(same_node=r < cfg.ranks_per_node)))
        # Each worker checks what it can before the ranks meet (its checkpoint, SGLang's import): a
        # failure there is reported now, not after rank 0 waited start_timeout_s at the rendezvous.
        self.receive(timeout=max(1.0, deadline - time.monotonic()))

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

    def _rendezvous(self):
        from .. import compat

        cfg = self.config
        if cfg.nnodes == 1:  # a private file store, gloo on loopback: nothing reachable from outside
            return compat.private_rendezvous(cfg.start_timeout_s)
        # Across nodes: SGLang's tcp://dist_init_addr; gloo on the interface that holds its host
        # (unless GLOO_SOCKET_IFNAME names one). torch's store there listens on every interface.
        host = cfg.dist_init_addr.rpartition(":")[0]
        interface = os.environ.get(compat.GLOO_INTERFACE_ENV) or interface_of_address(host)
        return compat.Rendezvous(gloo_interface=interface, start_timeout_s=cfg.start_timeout_s)

    def _spawn_local_workers(self, authkey: bytes, token: str) -> None:
        host, port = self.command_address
        # The key travels on the worker's stdin: a command line and a process environment are
        # readable in /proc by other processes of the user (and environ keeps a popped variable).
        env = {k: v for k, v in os.environ.items() if k != AUTHKEY_ENV}
        secret = f"{authkey.hex()}\n{token}\n".encode()
        for rank in range(1, self.config.ranks_per_node):
            p = subprocess.Popen(
                [sys.executable, "-m", "sglang_hf_bridge.engine.tp_worker", f"{host}:{port}", str(rank), "--local"],
                env=env, stdin=subprocess.PIPE)
            self.procs.append(p)
            try:
                p.stdin.write(secret)
                p.stdin.close()
            except OSError:  # it died already; the accept loop reports it
                pass

    def _accept(self, server: socket.socket, authkey: bytes, token: str, deadline: float) -> Dict[int, Any]:
        """Accept start-up connections until every rank said hello (or the start-up deadline
        passes). Each connection is handled beside the others with its own deadline; one that
        fails the challenge, says nothing, or names a wrong or taken rank is dropped."""
        cfg = self.config
        missing = set(range(1, cfg.tp_size))
        by_rank: Dict[int, Any] = {}
        pending: List[_Handshake] = []
        try:
            while missing:
                now = time.monotonic()
                if now > deadline:
                    raise WorkerError(
                        f"tensor-parallel start-up: rank(s) {sorted(missing)} did not connect within "
                        f"{cfg.start_timeout_s:.0f} s" + ("" if cfg.nnodes == 1 else
                                                          f"; start their followers, pointing at {self._address()}"))
                self._check_spawned()
                try:
                    sock, _ = server.accept()  # the listener waits 0.1 s at most (see wire.listening_socket)
                except OSError:  # socket.timeout included
                    sock = None
                if sock is not None and len(pending) >= MAX_PENDING_HANDSHAKES:
                    sock.close()
                elif sock is not None:
                    h = _Handshake(sock, authkey, min(now + self.timeout_s, deadline))
                    pending.append(h)
                    h.start()
                for h in list(pending):
                    if h.is_alive():
                        if time.monotonic() > h.deadline:
                            h.abort()  # the thread reads EOF and ends
                        continue
                    pending.remove(h)
                    rank = self._admit(h, missing, token)
                    if rank is None:
                        h.drop()
                        continue
                    bound_socket_waits(h.sock, self.timeout_s)
                    h.sock.close()  # the Connection keeps its own descriptor
                    by_rank[rank] = h.conn
                    missing.discard(rank)
        except BaseException:
            for conn in by_rank.values():
                conn.close()
            raise
        finally:
            for h in pending:
                h.abort()
                h.join(timeout=1.0)
                if not h.is_alive():
                    h.drop()
        return by_rank

    def _admit(self, h: _Handshake, missing: set, token: str) -> Optional[int]:
        """The rank a finished handshake may take, or None (wrong key, garbage, silence, a rank
        that is not expected or already taken, a local rank without the spawn token)."""
        if h.hello is None:
            return None
        rank, their_token = h.hello
        if rank not in missing:
            return None
        if rank < self.config.ranks_per_node:  # a local rank: only the process spawned for it knows the token
            if their_token is None or not hmac.compare_digest(their_token.encode(), token.encode()):
                return None
        return rank

    def _check_spawned(self) -> None:
        for rank, p in enumerate(self.procs, start=1):
            if p.poll() is not None:
                raise WorkerError(f"tensor-parallel worker rank {rank} (pid {p.pid}) exited with code "
                                  f"{p.returncode} during start-up (its error is printed above)")

    def _address(self) -> str:
        host, _, port = (self.config.dist_init_addr or "").rpartition(":")
        return f"{host}:{int(port or 0) + 1}"

    def wait_ready(self) -> None:
        """Every worker built its engine (rank 0 has built its own meanwhile)."""
        self.receive(timeout=self.config.start_timeout_s)

    # ------------------------------------------------------------------ calls
    def check_alive(self) -> None:
        """Raise :class:`WorkerError` if the group cannot take a call: broken by an earlier
        failure, a worker dead, or a worker stopped (SIGSTOP) for longer than the timeout."""
        if self._broken is not None:
            raise WorkerError(f"{self._broken}; close() this model and load it again")
        for rank, p in self._ranks():
            if p.poll() is not None:
                raise self._fail(f"tensor-parallel worker rank {rank} (pid {p.pid}) died with exit code "
                                 f"{p.returncode}")
            if _stopped(p):
                deadline = time.monotonic() + self.timeout_s
                while _stopped(p) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if _stopped(p):
                    raise self._fail(f"tensor-parallel worker rank {rank} (pid {p.pid}) is stopped (SIGSTOP?) "
                                     f"and did not continue within {self.timeout_s:.0f} s")

    def send_call(self, fn: Callable[..., Any], args: tuple, gather: bool = True) -> None:
        if not self.conns:
            return
        self.check_alive()
        if self._outstanding:  # rank 0 failed after the last send: its replies are still queued
            self.receive(raise_errors=False)
        message = ("call", (qualified_name(fn), args, gather))
        for rank, (c, p) in self._ranks_with_conns():
            try:
                send_message(c, message)
            except (OSError, ValueError) as e:
                raise self._fail(self._describe(rank, p, f"could not be sent the call ({e})")) from e
        self._outstanding = True

    def receive(self, timeout: Optional[float] = None, raise_errors: bool = True) -> List[Any]:
        """Every worker's reply to the last call, waiting at most ``timeout`` (default
        ``worker_timeout_s``) in all; all replies are read before an error is raised, so the
        channel stays in step."""
        if not self.conns:
            return []
        replies, silent = self._collect(self.timeout_s if timeout is None else timeout)
        if silent:
            raise self._fail("; ".join(silent))
        errors = [f"tensor-parallel worker rank {rank} failed:\n{value}"
                  for rank, (status, value) in replies.items() if status == "error"]
        if errors and raise_errors:
            raise WorkerError("\n".join(errors))
        return [replies[rank][1] for rank in sorted(replies)]

    def _collect(self, timeout: float) -> Tuple[Dict[int, Tuple[str, Any]], List[str]]:
        """Read one reply per worker within ``timeout``: ``({rank: (status, value)}, [what went
        wrong with each rank that did not answer])``."""
        deadline = time.monotonic() + timeout
        replies: Dict[int, Tuple[str, Any]] = {}
        silent: List[str] = []
        for rank, (c, p) in self._ranks_with_conns():
            try:
                while not c.poll(max(0.0, min(0.2, deadline - time.monotonic()))):
                    if p.poll() is not None or time.monotonic() >= deadline:
                        raise TimeoutError
                replies[rank] = receive_message(c)
            except (TimeoutError, EOFError, OSError, pickle.UnpicklingError) as e:
                if isinstance(e, TimeoutError):
                    what = f"did not answer within {timeout:.0f} s"
                else:  # its socket closes while the process is still exiting: let the exit show
                    what = f"was lost ({e!r})"
                    _has_exited(p)
                silent.append(self._describe(rank, p, what))
        self._outstanding = False
        return replies, silent

    def explain(self, exc: BaseException) -> BaseException:
        """What rank 0 should raise when its own share of a lockstep call raised ``exc``: a
        :class:`WorkerError` naming the rank(s) that are dead, stopped or silent (the group is
        then unusable), or -- when every worker answered -- ``exc`` itself, wrapped in a
        WorkerError if it is a failed collective."""
        from .. import compat

        if not self.conns:
            return exc
        collective = compat.is_collective_failure(exc)
        culprits = [self._describe(rank, p, "") + _queued_error(c) for rank, (c, p) in self._ranks_with_conns()
                    if p.poll() is not None or _stopped(p)]
        replies: Dict[int, Tuple[str, Any]] = {}
        if not culprits and self._outstanding:
            replies, culprits = self._collect(self.timeout_s)
        elif not culprits and collective:  # start-up: a worker that failed reports it, then exits
            for rank, (c, p) in self._ranks_with_conns():
                error = _queued_error(c, wait=min(5.0, self.timeout_s))
                if error or _has_exited(p):
                    culprits.append(self._describe(rank, p, "failed") + error)
        if culprits:
            return self._fail("; ".join(culprits) + f" (rank 0: {_first_line(exc)})")
        if collective:
            worker_errors = "".join(f"\nrank {r}: {_last_line(v)}" for r, (s, v) in replies.items() if s == "error")
            return self._fail(f"a tensor-parallel collective failed on rank 0: {_first_line(exc)}{worker_errors}")
        return exc

    def _fail(self, reason: str) -> WorkerError:
        """Mark the group unusable (every later call raises at once) and say why."""
        if self._broken is None:
            self._broken = reason
        return WorkerError(f"{reason}; close() this model and load it again")

    def _describe(self, rank: int, p, what: str) -> str:
        if p.pid is None:
            return f"tensor-parallel worker rank {rank} (on another node) {what}".rstrip()
        if p.poll() is not None:
            return f"tensor-parallel worker rank {rank} (pid {p.pid}) died with exit code {p.returncode}"
        if _stopped(p):
            return f"tensor-parallel worker rank {rank} (pid {p.pid}) is stopped (SIGSTOP?)"
        return f"tensor-parallel worker rank {rank} (pid {p.pid}) {what or 'did not respond'}"

    def _ranks(self):
        return list(enumerate(self.procs, start=1))

    def _ranks_with_conns(self):
        return list(enumerate(zip(self.conns, self.procs), start=1))

    # ------------------------------------------------------------------ shutdown
    def stop(self) -> None:
        """Stop every worker: healthy ones are asked to close (and killed after a grace period),
        dead, stopped or hung ones -- or all of them once the group failed -- are killed at once.
        Followers on other nodes exit when their connection closes."""
        from .. import compat

        graceful = []
        for c, p in zip(self.conns, self.procs):
            ok = self._broken is None and p.poll() is None and not _stopped(p)
            if ok:
                try:
                    send_message(c, ("close", ()))
                except (OSError, ValueError):
                    ok = False
            graceful.append(ok)
        graceful += [False] * (len(self.procs) - len(graceful))  # spawned but never connected
        deadline = time.monotonic() + min(CLOSE_GRACE_S, self.timeout_s)
        for p, ok in zip(self.procs, graceful):
            if p.pid is None:
                continue
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()) if ok else 0)
            except subprocess.TimeoutExpired:
                p.kill()  # SIGKILL also ends a stopped process
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        for c in self.conns:
            c.close()
        compat.forget_rendezvous(self._dist_port)  # only if rank 0 never started its engine
        self.procs, self.conns = [], []


def _stopped(p) -> bool:
    return p.pid is not None and p.poll() is None and process_state(p.pid) in ("T", "t")


def _has_exited(p, wait: float = 2.0) -> bool:
    """Whether a local worker exits within ``wait`` seconds (its sockets close a moment before)."""
    if p.pid is None:
        return False
    try:
        p.wait(timeout=wait)
        return True
    except subprocess.TimeoutExpired:
        return False


def _queued_error(conn, wait: float = 0.0) -> str:
    """The traceback a worker sent before it exited (start-up failures), if one arrives within
    ``wait`` seconds."""
    try:
        if conn.poll(wait):
            status, value = receive_message(conn)
            if status == "error":
                return f":\n{value}"
    except (EOFError, OSError, pickle.UnpicklingError, ValueError, TypeError):
        pass
    return ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _last_line(text: Any) -> str:
    lines = str(text).strip().splitlines()
    return lines[-1] if lines else ""


# ---------------------------------------------------------------------- rank 0
class Rank0Engine(RankEngine):
    """Rank 0's engine when there are workers. The same engine, plus: start-up ends with the
    lockstep warm-up that bounds the collectives (:func:`~.rank.warm_up_then_bound_collectives`), and a failure in
    its own share of a call -- a collective that timed out because a worker stopped, or broke
    because one died -- is reported as :class:`WorkerError` naming that rank (``explain``)."""

    def __init__(self, group: WorkerGroup, dist_port: int):
        super().__init__(group.config, rank=0, dist_port=dist_port)
        self.group = group

    def start(self, weights) -> "Rank0Engine":
        try:
            super().start(weights)
            warm_up_then_bound_collectives(self)
        except Exception as e:
            error = self.group.explain(e)
            if error is e:
                raise
            raise error from e
        return self

    def forward(self, call):
        try:
            return super().forward(call)
        except Exception as e:
            error = self.group.explain(e)
            if error is e:
                raise
            raise error from e


