"""tp_size=2 lifecycle: workers stop on close, die with the user's process, and a dead worker
is reported instead of hanging. (Own module: SGLang allows one parallel runtime per process, so
no other engine may be alive here.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import REPO, build_checkpoint, max_abs_diff

from sglang_hf_bridge import SGLangRobertaForMaskedLM, WorkerError
from sglang_hf_bridge.process import free_local_port

TOL = 1e-5


def test_close_stops_workers_then_tp1_works_again(tmp_path):
    hf = build_checkpoint(tmp_path, "roberta", seed=22)
    model = SGLangRobertaForMaskedLM.from_pretrained(tmp_path, tp_size=2)
    procs = list(model.runtime.workers.procs)
    workers = [p.pid for p in procs]
    assert workers
    model.close()
    assert all(p.poll() is not None for p in procs)
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    with SGLangRobertaForMaskedLM.from_pretrained(tmp_path) as single:
        ids = torch.tensor([[0, 5, 6, 2]])
        assert max_abs_diff(single(ids).logits, hf(ids).logits) <= TOL


def test_dead_worker_is_reported_not_hung(tmp_path):
    build_checkpoint(tmp_path, "roberta", seed=23)
    model = SGLangRobertaForMaskedLM.from_pretrained(tmp_path, tp_size=2)
    try:
        model.runtime.workers.procs[0].kill()
        model.runtime.workers.procs[0].wait()
        t0 = time.time()
        with pytest.raises(WorkerError, match="rank 1 .*died"):
            model(torch.tensor([[0, 5, 2]]))
        assert time.time() - t0 < 30
    finally:
        model.close()


def test_workers_exit_when_the_user_process_dies(tmp_path):
    build_checkpoint(tmp_path, "roberta", seed=24)
    code = textwrap.dedent(f"""
        import os, sys, torch
        from sglang_hf_bridge import SGLangRobertaForMaskedLM
        m = SGLangRobertaForMaskedLM.from_pretrained({str(tmp_path)!r}, tp_size=2)
        m(torch.tensor([[0, 5, 2]]))
        print(" ".join(str(p.pid) for p in m.runtime.workers.procs), flush=True)
        os.kill(os.getpid(), 9)   # no close(), no atexit: the hardest way to die
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    pids = [int(x) for x in r.stdout.split()]
    assert pids
    deadline = time.time() + 20
    while time.time() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
        time.sleep(0.5)
    assert not any(os.path.exists(f"/proc/{p}") for p in pids), "orphan TP workers"


def test_two_nodes_on_loopback(tmp_path, monkeypatch):
    """Multi-node TP through SGLang's nnodes / dist_init_addr: this process is node 0 (rank 0), a
    follower started by hand plays node 1 (rank 1), both on loopback."""
    import secrets

    hf = build_checkpoint(tmp_path, "roberta", seed=25)
    authkey = secrets.token_hex(32)
    monkeypatch.setenv("SGLANG_HF_BRIDGE_TP_AUTHKEY", authkey)
    port = free_local_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), SGLANG_HF_BRIDGE_TP_AUTHKEY=authkey)
    follower = subprocess.Popen([sys.executable, "-m", "sglang_hf_bridge.engine.tp_worker",
                                 f"127.0.0.1:{port + 1}", "1"], env=env)
    try:
        model = SGLangRobertaForMaskedLM.from_pretrained(tmp_path, tp_size=2, nnodes=2,
                                                         dist_init_addr=f"127.0.0.1:{port}")
        try:
            ids = torch.tensor([[0, 5, 6, 7, 2], [0, 8, 2, 1, 1]])
            mask = (ids != 1).long()
            with torch.no_grad():
                assert max_abs_diff(model(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits) <= TOL
            assert model.runtime.workers.procs[0].pid is None  # the rank lives in the follower
        finally:
            model.close()
        follower.wait(timeout=30)
        assert follower.returncode == 0
    finally:
        if follower.poll() is None:
            follower.kill()
