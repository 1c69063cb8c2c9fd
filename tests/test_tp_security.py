"""tp_size=2 that cannot be reached or hung (issue 12, item 4): every listening socket on one node
is loopback, the start-up handshake drops silent, garbage and impostor clients, the workers' key
is in neither their command line nor their environment, and a stopped or killed worker makes the
call raise WorkerError within the configured timeout, after which close() cleans up in seconds.

Also the SGLang 0.5.23 / torch behaviours behind ``compat``'s rendezvous and timeout workarounds.
(Own module: SGLang allows one parallel runtime per process, so no other engine may be alive here.)
"""

from __future__ import annotations

import dataclasses
import inspect
import ipaddress
import json
import os
import pickle
import re
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta
from multiprocessing.connection import AuthenticationError, Client

import pytest
import torch
from conftest import REPO, build_checkpoint, max_abs_diff

from sglang_hf_bridge import SGLangRobertaForMaskedLM, WorkerError, compat
from sglang_hf_bridge.engine import workers as workers_module
from sglang_hf_bridge.engine.config import AUTHKEY_ENV
from sglang_hf_bridge.process import free_local_port

TIMEOUT_S = 10.0  # worker_timeout_s of every TP engine here (the default is 30 s)
TOL = 1e-5


# ---------------------------------------------------------------------- helpers
def listening_sockets(pids):
    """``[(pid, ip, port)]`` of the TCP sockets in LISTEN state that ``pids`` hold open."""
    owner = {}
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                owner[target[len("socket:["):-1]] = pid
    found = []
    for family, path in ((socket.AF_INET, "/proc/net/tcp"), (socket.AF_INET6, "/proc/net/tcp6")):
        with open(path) as f:
            lines = f.read().splitlines()[1:]
        for line in lines:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in owner:  # 0A = LISTEN
                continue
            addr, port = fields[1].split(":")
            raw = bytes.fromhex(addr)  # 32-bit words in host (little-endian) order
            raw = b"".join(struct.pack("<I", struct.unpack(">I", raw[i:i + 4])[0]) for i in range(0, len(raw), 4))
            found.append((owner[fields[9]], socket.inet_ntop(family, raw), int(port, 16)))
    return found


def is_loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_loopback


def with_worker_timeout(monkeypatch, seconds: float = TIMEOUT_S) -> None:
    """Set EngineConfig.worker_timeout_s on the way (what from_pretrained(worker_timeout_s=) sets),
    for every load in the test, however it is started."""
    from sglang_hf_bridge.modeling.base import SGLangPreTrainedModel

    original = SGLangPreTrainedModel.__dict__["_engine_config"].__func__

    def engine_config(cls, *args, **kwargs):
        return dataclasses.replace(original(cls, *args, **kwargs), worker_timeout_s=seconds)

    monkeypatch.setattr(SGLangRobertaForMaskedLM, "_engine_config", classmethod(engine_config))


def read_until_closed(sock: socket.socket, out: dict, key: str, t0: float) -> None:
    """Record when the server drops ``sock`` (EOF or reset)."""
    sock.settimeout(120)
    try:
        while sock.recv(4096):
            pass
    except OSError:
        pass
    out[key] = time.monotonic() - t0


def gone(pid: int) -> bool:
    if not os.path.exists(f"/proc/{pid}"):
        return True
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0] == "Z"


# ---------------------------------------------------------------------- compat: what the workarounds avoid
def test_sglang_rendezvous_store_listens_on_every_interface(monkeypatch):
    """The bug: SGLang meets at ``tcp://127.0.0.1:PORT`` (or ``dist_init_addr``), and torch's
    TCPStore behind it listens on every interface whatever the host says, open to anyone who
    connects. The workaround: SGLang's own override variable takes a ``file://`` init method."""
    from sglang.srt.distributed import bootstrap

    port = free_local_port()
    store = torch.distributed.TCPStore("127.0.0.1", port, 1, True, timedelta(seconds=10))
    try:
        addresses = [ip for pid, ip, p in listening_sockets([os.getpid()]) if p == port]
        assert addresses and all(not is_loopback(ip) and ipaddress.ip_address(ip).is_unspecified for ip in addresses)
    finally:
        del store
    monkeypatch.setenv(compat.RENDEZVOUS_ENV, "file:///somewhere/private/store")
    assert bootstrap._resolve_dist_init_method(dist_port=port) == "file:///somewhere/private/store"


_GLOO_SCRIPT = """
import json, os, socket, struct, tempfile
import torch.distributed as dist
{listening_sockets}
path = os.path.join(tempfile.mkdtemp(), "store")
dist.init_process_group("gloo", init_method="file://" + path, rank=0, world_size=1)
print(json.dumps(sorted({{ip for _, ip, _ in listening_sockets([os.getpid()])}})))
"""


def _gloo_listen_addresses(interface=None):
    env = {k: v for k, v in os.environ.items() if k != compat.GLOO_INTERFACE_ENV}
    if interface:
        env[compat.GLOO_INTERFACE_ENV] = interface
    script = _GLOO_SCRIPT.format(listening_sockets=inspect.getsource(listening_sockets))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return set(json.loads(r.stdout.strip().splitlines()[-1]))


def test_gloo_binds_where_the_host_name_resolves_unless_told():
    """The bug: gloo's sockets bind to the address the host name resolves to (a LAN address on
    most machines; loopback only on this test VM). The workaround: ``GLOO_SOCKET_IFNAME`` names
    the interface (``lo`` on one node) while SGLang builds its groups."""
    resolved = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    assert _gloo_listen_addresses() <= resolved
    assert _gloo_listen_addresses("lo") == {"127.0.0.1"}
    import psutil

    other = next(((name, a.address) for name, addrs in psutil.net_if_addrs().items() for a in addrs
                  if a.family == socket.AF_INET and not is_loopback(a.address)), None)
    if other is not None:  # the variable really moves the sockets
        assert _gloo_listen_addresses(other[0]) == {other[1]}


_STOPPED_PEER_SCRIPT = textwrap.dedent("""
    import datetime, os, signal, sys, time
    import torch, torch.distributed as dist
    rank, path, bound = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    sys.path.insert(0, sys.argv[4])
    from sglang_hf_bridge import compat
    dist.init_process_group("gloo", init_method="file://" + path, rank=rank, world_size=2)
    group = dist.new_group([0, 1], backend="gloo")
    print("default", dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu")).options._timeout,
          flush=True)
    if bound:
        dist.set_timeout(datetime.timedelta(seconds=bound), group)
    x = torch.ones(2)
    dist.all_reduce(x, group=group)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        dist.all_reduce(x, group=group)
        print("no error", flush=True)
    except Exception as e:
        print("raised", round(time.monotonic() - t0, 1), type(e).__name__, compat.is_collective_failure(e), flush=True)
""")


def test_gloo_waits_for_a_stopped_peer_until_its_group_timeout(tmp_path):
    """The bug: SGLang's groups wait for a silent peer 30 minutes (torch's default, SGLang's
    ``dist_timeout`` unset) or 120 (its CPU-side gloo groups). The workaround: torch's
    ``set_timeout`` on every group once the engine runs (``bound_collective_timeouts``); gloo then
    raises a plain RuntimeError that ``is_collective_failure`` recognises."""
    from sglang.srt.distributed.parallel_state import GroupCoordinator

    assert inspect.signature(GroupCoordinator.__init__).parameters["gloo_timeout"].default == timedelta(minutes=120)
    assert torch.distributed.distributed_c10d.default_pg_timeout == timedelta(minutes=30)
    path = str(tmp_path / "store")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    peers = [subprocess.Popen([sys.executable, "-c", _STOPPED_PEER_SCRIPT, str(rank), path, "3", str(REPO)],
                              stdout=subprocess.PIPE, text=True, env=env) for rank in (0, 1)]
    try:
        out, _ = peers[0].communicate(timeout=120)
    finally:
        for p in peers:
            p.kill()
            p.wait()
    assert "default 0:30:00" in out
    raised = [line.split() for line in out.splitlines() if line.startswith("raised")]
    assert raised and float(raised[0][1]) < 30 and raised[0][2] == "RuntimeError" and raised[0][3] == "True", out


def test_rendezvous_settings_last_only_while_sglang_builds_its_groups(monkeypatch):
    """What SGLang sees while it builds the groups (file store, loopback gloo, start-up timeout),
    and that nothing of it stays in the environment; the private directory goes with the runtime."""
    from sglang.srt.distributed import parallel_state

    monkeypatch.setattr(compat, "_parallel_users", {"count": 0, "key": None})
    monkeypatch.setattr(parallel_state, "destroy_model_parallel", lambda: None)
    monkeypatch.setattr(parallel_state, "destroy_distributed_environment", lambda: None)
    monkeypatch.delenv(compat.RENDEZVOUS_ENV, raising=False)
    monkeypatch.setenv(compat.GLOO_INTERFACE_ENV, "eth-of-the-user")  # single node ignores it, then restores it
    seen = []

    class Bootstrap:
        @staticmethod
        def init_parallel_runtime(server_args, device, dist_port):
            from sglang.srt.runtime_context import get_parallel

            try:
                timeout = get_parallel().dist_timeout
            except ValueError:  # nothing published and no override: SGLang's default
                timeout = None
            seen.append((os.environ.get(compat.RENDEZVOUS_ENV), os.environ.get(compat.GLOO_INTERFACE_ENV), timeout))

    rendezvous = compat.private_rendezvous(start_timeout_s=99.5)
    assert oct(os.stat(rendezvous.directory).st_mode & 0o777) == "0o700"
    compat.register_rendezvous(4321, rendezvous)
    compat.init_parallel_runtime_once(Bootstrap, None, "cpu", 4321, 2)
    assert seen == [(rendezvous.init_method, "lo", 100)]
    assert rendezvous.init_method.startswith("file://" + rendezvous.directory)
    assert os.environ.get(compat.RENDEZVOUS_ENV) is None
    assert os.environ[compat.GLOO_INTERFACE_ENV] == "eth-of-the-user"
    compat.release_parallel_runtime()
    assert not os.path.exists(rendezvous.directory)
    # a single-rank engine gets its own private rendezvous (SGLang would open a TCP store)
    compat.init_parallel_runtime_once(Bootstrap, None, "cpu", 4322, 1)
    assert seen[-1][0].startswith("file://") and seen[-1][1] == "lo" and seen[-1][2] is None
    directory = compat._parallel_users["rendezvous"].directory
    compat.release_parallel_runtime()
    assert not os.path.exists(directory)


# ---------------------------------------------------------------------- single rank
def test_single_rank_engine_listens_only_on_loopback(roberta_tp_checkpoint):
    path, hf = roberta_tp_checkpoint
    with SGLangRobertaForMaskedLM.from_pretrained(path) as model:
        ids = torch.tensor([[0, 5, 6, 2]])
        assert max_abs_diff(model(ids).logits, hf(ids).logits) <= TOL
        sockets = listening_sockets([os.getpid()])
        assert sockets and all(is_loopback(ip) for _, ip, _ in sockets), sockets


# ---------------------------------------------------------------------- tp_size=2, one start for these
@pytest.fixture(scope="module")
def roberta_tp_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp-security-ckpt")
    return path, build_checkpoint(path, "roberta", seed=31)


@pytest.fixture(scope="module")
def attacked_start(roberta_tp_checkpoint):
    """A tp=2 start during which, before the real worker is even spawned, five clients connect to
    the start-up listener: a silent one, one that sends garbage, one that hangs up, one with a wrong
    key, and one with the right key claiming rank 1 without the spawn token."""
    path, hf = roberta_tp_checkpoint
    mp = pytest.MonkeyPatch()
    with_worker_timeout(mp)
    seen: dict = {}
    original = workers_module.WorkerGroup._spawn_local_workers
    threads = []

    def spawn_after_attacks(group, authkey, token):
        seen.update(authkey=authkey.hex(), token=token, address=group.command_address)
        t0 = time.monotonic()
        silent = socket.create_connection(group.command_address)
        garbage = socket.create_connection(group.command_address)
        garbage.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(64))
        socket.create_connection(group.command_address).close()

        def wrong_key():
            try:
                Client(group.command_address, authkey=b"not the key").close()
                seen["wrong_key"] = "accepted"
            except (AuthenticationError, EOFError, OSError) as e:
                seen["wrong_key"] = type(e).__name__

        def impostor():
            c = Client(group.command_address, authkey=authkey)
            c.send_bytes(pickle.dumps(("hello", 1, None)))
            try:
                seen["impostor_got"] = pickle.loads(c.recv_bytes())
            except (EOFError, OSError) as e:
                seen["impostor_got"] = type(e).__name__

        for target, args in ((read_until_closed, (silent, seen, "silent_dropped_after", t0)),
                             (read_until_closed, (garbage, seen, "garbage_dropped_after", t0)),
                             (wrong_key, ()), (impostor, ())):
            threads.append(threading.Thread(target=target, args=args, daemon=True))
            threads[-1].start()
        time.sleep(0.5)  # the attackers are in before the worker exists
        return original(group, authkey, token)

    mp.setattr(workers_module.WorkerGroup, "_spawn_local_workers", spawn_after_attacks)
    t0 = time.monotonic()
    try:
        model = SGLangRobertaForMaskedLM.from_pretrained(path, tp_size=2)
    finally:
        mp.undo()
    seen["start_s"] = time.monotonic() - t0
    for t in threads:
        t.join(timeout=60)
    yield hf, model, seen
    model.close()


def test_start_up_drops_silent_garbage_and_impostor_clients(attacked_start):
    hf, model, seen = attacked_start
    assert model.runtime.workers.timeout_s == TIMEOUT_S
    ids = torch.tensor([[0, 5, 6, 7, 2], [0, 8, 2, 1, 1]])
    mask = (ids != 1).long()
    with torch.no_grad():
        assert max_abs_diff(model(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits) <= TOL
    assert seen["wrong_key"] == "AuthenticationError"
    assert seen["impostor_got"] == "EOFError"  # dropped, never sent the config
    assert seen["garbage_dropped_after"] < TIMEOUT_S + 20
    assert seen["silent_dropped_after"] < TIMEOUT_S + 20  # its own deadline, not the start-up's (600 s)
    assert seen["start_s"] < 300


def test_every_listening_socket_is_loopback(attacked_start):
    _, model, seen = attacked_start
    pids = [os.getpid()] + [p.pid for p in model.runtime.workers.procs]
    sockets = listening_sockets(pids)
    assert {pid for pid, _, _ in sockets} == set(pids)  # both ranks' gloo sockets are there
    wildcard = [s for s in sockets if ipaddress.ip_address(s[1]).is_unspecified]
    assert wildcard == [], f"reachable from other hosts: {wildcard}"
    assert all(is_loopback(ip) for _, ip, _ in sockets), sockets
    assert seen["address"][1] not in {port for _, _, port in sockets}  # the start-up listener is closed


def test_worker_key_is_in_neither_command_line_nor_environment(attacked_start):
    _, model, seen = attacked_start
    for p in model.runtime.workers.procs:
        with open(f"/proc/{p.pid}/cmdline", "rb") as f:
            cmdline = f.read()
        with open(f"/proc/{p.pid}/environ", "rb") as f:
            environ = f.read()
        for secret in (seen["authkey"], seen["token"]):
            assert secret.encode() not in cmdline and secret.encode() not in environ
        assert AUTHKEY_ENV.encode() not in environ


def test_collectives_are_bounded_by_the_worker_timeout(attacked_start):
    """Every group of rank 0 (SGLang's coordinators and the default group) gives up after 10 s."""
    from sglang.srt.distributed import parallel_state

    groups = [torch.distributed.distributed_c10d._get_default_group()]
    for ref in parallel_state._groups.values():
        coordinator = ref()
        if coordinator is not None:
            groups += [g for g in (coordinator.device_group, coordinator.cpu_group) if g is not None]
    timeouts = {g._get_backend(torch.device("cpu")).options._timeout for g in groups}
    assert timeouts == {timedelta(seconds=TIMEOUT_S)}


def test_stopped_worker_before_a_call(attacked_start):
    """(Last user of the shared start: the model is unusable afterwards.)"""
    _, model, _ = attacked_start
    proc = model.runtime.workers.procs[0]
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match=r"rank 1 \(pid \d+\) is stopped"):
            model(torch.tensor([[0, 5, 2]]))
        assert time.monotonic() - t0 < 60
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match="rank 1"):  # and every later call, at once
            model(torch.tensor([[0, 5, 2]]))
        assert time.monotonic() - t0 < 5
    finally:
        t0 = time.monotonic()
        model.close()
        closed_in = time.monotonic() - t0
    assert closed_in < 15
    assert gone(proc.pid)


def test_worker_that_fails_before_the_ranks_meet_fails_the_start_at_once(tmp_path, monkeypatch):
    """A worker that cannot start (here: its checkpoint vanished) is reported with its traceback
    as soon as it fails, not after rank 0 waited start_timeout_s (600 s) at the rendezvous."""
    path = tmp_path / "ckpt"
    build_checkpoint(path, "roberta", seed=33)
    original = workers_module.WorkerGroup._spawn_local_workers

    def spawn_without_checkpoint(group, authkey, token):
        path.rename(tmp_path / "moved")
        return original(group, authkey, token)

    monkeypatch.setattr(workers_module.WorkerGroup, "_spawn_local_workers", spawn_without_checkpoint)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"(?s)rank 1 failed.*ckpt"):
        SGLangRobertaForMaskedLM.from_pretrained(path, tp_size=2)
    assert time.monotonic() - t0 < 120
    assert compat._parallel_users["count"] == 0  # nothing left held: the next engine can start


def test_follower_on_another_node_reads_its_key_from_stdin(roberta_tp_checkpoint, monkeypatch):
    """A follower started by hand (here on loopback, playing node 1) takes the shared key on stdin,
    so it never appears in its environment; it exits when the model is closed."""
    import secrets

    path, hf = roberta_tp_checkpoint
    authkey = secrets.token_hex(32)
    monkeypatch.setenv(AUTHKEY_ENV, authkey)  # rank 0 (node 0) reads it from its environment
    with_worker_timeout(monkeypatch)
    port = free_local_port()
    env = {k: v for k, v in os.environ.items() if k != AUTHKEY_ENV}
    env["PYTHONPATH"] = str(REPO)
    follower = subprocess.Popen([sys.executable, "-m", "sglang_hf_bridge.engine.tp_worker", f"127.0.0.1:{port + 1}",
                                 "1"], env=env, stdin=subprocess.PIPE)
    try:
        follower.stdin.write(f"{authkey}\n".encode())
        follower.stdin.close()
        model = SGLangRobertaForMaskedLM.from_pretrained(path, tp_size=2, nnodes=2, dist_init_addr=f"127.0.0.1:{port}")
        try:
            ids = torch.tensor([[0, 5, 6, 7, 2]])
            with torch.no_grad():
                assert max_abs_diff(model(ids).logits, hf(ids).logits) <= TOL
            with open(f"/proc/{follower.pid}/environ", "rb") as f:
                assert authkey.encode() not in f.read()
        finally:
            model.close()
        assert follower.wait(timeout=30) == 0
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()


# ---------------------------------------------------------------------- faults in the middle of a call
def _fault_during_a_call(path, monkeypatch, sig):
    """Start tp=2, then signal the worker while calls run back to back (each ~0.5-1 s here)."""
    with_worker_timeout(monkeypatch)
    model = SGLangRobertaForMaskedLM.from_pretrained(path, tp_size=2)
    proc = model.runtime.workers.procs[0]
    ids = torch.randint(3, 1000, (16, 120))
    events = []

    def signal_soon():
        time.sleep(1.0)
        events.append(("signal", time.monotonic()))
        os.kill(proc.pid, sig)

    try:
        threading.Thread(target=signal_soon, daemon=True).start()
        with pytest.raises(WorkerError) as info:
            for _ in range(200):
                events.append(("call", time.monotonic()))
                model.compute_mlm_logits(ids, torch.ones_like(ids), positions=[[5, 7]] * len(ids))
        failed_at = time.monotonic()
    except BaseException:
        model.close()
        raise
    sent = next(t for kind, t in events if kind == "signal")
    t0 = time.monotonic()
    model.close()
    closed_in = time.monotonic() - t0
    return info.value, failed_at - sent, closed_in, proc


@pytest.fixture(scope="module")
def larger_checkpoint(tmp_path_factory):
    """Big enough that a call takes a while, so the signal lands inside one."""
    path = tmp_path_factory.mktemp("tp-fault-ckpt")
    build_checkpoint(path, "roberta", seed=32, hidden_size=256, num_hidden_layers=8, intermediate_size=1024,
                     num_attention_heads=8)
    return path


def test_worker_stopped_during_a_call(larger_checkpoint, monkeypatch):
    error, after, closed_in, proc = _fault_during_a_call(larger_checkpoint, monkeypatch, signal.SIGSTOP)
    assert re.search(r"rank 1 \(pid \d+\) is stopped", str(error)), error
    assert after < 60  # rank 0's collective gives up after worker_timeout_s=10, not gloo's 30/120 min
    assert closed_in < 15 and gone(proc.pid)


def test_worker_killed_during_a_call(larger_checkpoint, monkeypatch):
    error, after, closed_in, proc = _fault_during_a_call(larger_checkpoint, monkeypatch, signal.SIGKILL)
    assert re.search(r"rank 1 \(pid \d+\) died with exit code -9", str(error)), error
    assert after < 60
    assert closed_in < 15 and gone(proc.pid)
