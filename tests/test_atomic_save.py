"""Saves never lose data: a save killed (SIGKILL) or interrupted (Ctrl-C) at any instant leaves the
directory holding the old checkpoint or the new one, whole, and keeps the files it does not own."""

from __future__ import annotations

import copy
import errno
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, build_checkpoint
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import PretrainedConfig, RobertaForMaskedLM

from sglang_hf_bridge import atomic_dir
from sglang_hf_bridge.atomic_dir import ADAPTER_FILES, MODEL_FILES, cleanup_leftovers, replacing_directory
from sglang_hf_bridge.errors import AdapterFileError

IDS = torch.tensor([[0, 5, 6, 7, 8, 2], [0, 9, 10, 2, 1, 1]])
MASK = (IDS != 1).long()
LEFTOVER = re.compile(r"\.(saving|old)-(\d+)-")


# ---------------------------------------------------------------------------------------- helpers
def _state(directory) -> dict:
    """The weights transformers loads from ``directory`` (fails if it is not a whole checkpoint)."""
    return RobertaForMaskedLM.from_pretrained(directory).state_dict()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _debris(root: Path) -> list:
    """Staging/old directories and temp files next to or anywhere under ``root``."""
    names = [p.name for p in root.parent.iterdir() if LEFTOVER.search(p.name)]
    for folder, dirs, files in os.walk(root):
        names += [n for n in dirs + files if LEFTOVER.search(n) or n.endswith(".tmp")]
    return names


def _add_user_files(target: Path) -> dict:
    """Files a user keeps next to a checkpoint; returns {relative path: bytes}."""
    files = {
        "tokenizer_config.json": b'{"model_max_length": 128}',
        "trainer_state.json": b'{"global_step": 1}',
        "checkpoint-1/model.safetensors": b"not touched: a Trainer checkpoint of its own",
        "checkpoint-1/nested/optimizer.pt": b"\x00\x01",
    }
    for rel, data in files.items():
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        (target / rel).write_bytes(data)
    return files


def _assert_files(target: Path, files: dict) -> None:
    for rel, data in files.items():
        assert (target / rel).read_bytes() == data, rel


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def old_checkpoint(tmp_path_factory):
    """A good checkpoint (other weights than the engine's) and the weights transformers loads from it."""
    path = tmp_path_factory.mktemp("old-ckpt") / "ckpt"
    build_checkpoint(path, "roberta", seed=5)
    return path, _state(path)


@pytest.fixture(scope="module")
def new_state(roberta, tmp_path_factory):
    _, model = roberta
    path = tmp_path_factory.mktemp("new-ckpt") / "ckpt"
    model.save_pretrained(path)
    return _state(path)


def _fresh_target(tmp_path: Path, old_checkpoint) -> Path:
    target = tmp_path / "out"
    shutil.copytree(old_checkpoint[0], target)
    return target


# --------------------------------------------------------------------------- model saves (engine)
def _half_then_interrupt(real):
    def broken(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise KeyboardInterrupt

    return broken


@pytest.mark.parametrize("where", ["weights", "config"])
def test_interrupted_save_keeps_old_checkpoint(roberta, old_checkpoint, new_state, tmp_path, monkeypatch, where):
    _, model = roberta
    target = _fresh_target(tmp_path, old_checkpoint)
    files = _add_user_files(target)
    if where == "weights":
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file", _half_then_interrupt(safetensors.torch.save_file))
    else:  # the weights are whole, config.json half-written
        def broken_config(self, save_directory, **kwargs):
            with open(os.path.join(save_directory, "config.json"), "w") as f:
                f.write(self.to_json_string()[:50])
            raise KeyboardInterrupt

        monkeypatch.setattr(PretrainedConfig, "save_pretrained", broken_config)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(target)
    monkeypatch.undo()
    assert _same(_state(target), old_checkpoint[1])
    _assert_files(target, files)
    assert _debris(target) == []
    assert sorted(os.listdir(tmp_path)) == ["out"]
    model.save_pretrained(target)  # and the next save goes through
    assert _same(_state(target), new_state)
    _assert_files(target, files)


def test_save_keeps_other_files_drops_stale_weights_keeps_mode(roberta, old_checkpoint, new_state, tmp_path):
    _, model = roberta
    target = _fresh_target(tmp_path, old_checkpoint)
    files = _add_user_files(target)
    torch.save({"stale": torch.zeros(2)}, target / "pytorch_model.bin")  # an older .bin save
    (target / "model-00002-of-00002.safetensors").write_bytes(b"stale shard")
    os.chmod(target, 0o750)
    inode = (target / "tokenizer_config.json").stat().st_ino
    model.save_pretrained(target)
    assert _same(_state(target), new_state)
    assert sorted(p.name for p in target.iterdir()) == ["checkpoint-1", "config.json", "merges.txt",
                                                        "model.safetensors", "tokenizer_config.json",
                                                        "trainer_state.json", "vocab.json"]
    _assert_files(target, files)
    assert (target / "tokenizer_config.json").stat().st_ino == inode  # linked, not copied
    assert (target.stat().st_mode & 0o777) == 0o750
    assert _debris(target) == []


def test_save_through_symlink_and_into_new_dir(roberta, new_state, tmp_path):
    _, model = roberta
    real = tmp_path / "real"
    real.mkdir()
    (real / "tokenizer_config.json").write_text("{}")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    model.save_pretrained(link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert _same(_state(real), new_state)
    assert (real / "tokenizer_config.json").read_text() == "{}"
    model.save_pretrained(tmp_path / "a" / "b")  # parents made, as os.makedirs did
    assert _same(_state(tmp_path / "a" / "b"), new_state)
    assert sorted(os.listdir(tmp_path)) == ["a", "link", "real"]


def test_save_into_a_file_raises_as_before(roberta, tmp_path):
    _, model = roberta
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        model.save_pretrained(path)
    assert path.read_text() == "x"


# ------------------------------------------------------------------------------------------- adapters
def _peft_adapter(hf, directory, seed):
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                              target_modules=["query", "value"])).eval()
    peft_model.save_pretrained(directory)
    return peft_model


def _peft_logits(hf, directory):
    with torch.no_grad():
        return PeftModel.from_pretrained(copy.deepcopy(hf), directory).eval()(IDS, attention_mask=MASK).logits


def test_adapter_save_interrupted_then_whole(roberta, tmp_path, monkeypatch):
    import safetensors.torch

    hf, model = roberta
    _peft_adapter(hf, tmp_path / "old", seed=1)
    _peft_adapter(hf, tmp_path / "new", seed=2)
    old_logits, new_logits = _peft_logits(hf, tmp_path / "old"), _peft_logits(hf, tmp_path / "new")
    target = tmp_path / "out"
    shutil.copytree(tmp_path / "old", target)  # PEFT's README.md comes along: a file to keep
    (target / "adapter_model.bin").write_bytes(b"stale")
    files = _add_user_files(target)
    files["README.md"] = (target / "README.md").read_bytes()
    model.load_adapter(tmp_path / "new", adapter_name="new")
    try:
        monkeypatch.setattr(safetensors.torch, "save_file", _half_then_interrupt(safetensors.torch.save_file))
        with pytest.raises(KeyboardInterrupt):
            model.save_adapter(target, "new")
        monkeypatch.undo()
        assert torch.equal(_peft_logits(hf, target), old_logits)
        assert (target / "adapter_model.bin").read_bytes() == b"stale"
        _assert_files(target, files)
        assert _debris(target) == []

        model.save_adapter(target, "new")
        assert torch.equal(_peft_logits(hf, target), new_logits)
        assert not (target / "adapter_model.bin").exists()  # the older save's weights do not linger
        _assert_files(target, files)
        assert _debris(target) == []
        with pytest.raises(AdapterFileError, match="is a file"):
            model.save_adapter(target / "README.md", "new")
    finally:
        model.delete_adapter("new")


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _base_state(target: Path, scratch: Path) -> dict:
    """The base weights of an adapter + base directory (transformers, seeing adapter_config.json,
    would load the adapter's base model instead)."""
    scratch.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(target / name, scratch / name)
    return _state(scratch)


def test_adapter_and_base_swapped_together(roberta, old_checkpoint, new_state, tmp_path, monkeypatch):
    """save_pretrained(save_base_model=True): adapter and base in one staging directory, one swap;
    a failure while writing the base leaves the old adapter *and* the old base."""
    hf, model = roberta
    _peft_adapter(hf, tmp_path / "old", seed=3)
    _peft_adapter(hf, tmp_path / "new", seed=4)
    target = _fresh_target(tmp_path, old_checkpoint)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(tmp_path / "old" / name, target / name)
    old_adapter = load_file(target / "adapter_model.safetensors")
    model.load_adapter(tmp_path / "new", adapter_name="both")
    try:
        monkeypatch.setattr(PretrainedConfig, "save_pretrained", _interrupt)  # after the adapter files
        with pytest.raises(KeyboardInterrupt):
            model.save_pretrained(target, save_base_model=True)
        monkeypatch.undo()
        assert _same(load_file(target / "adapter_model.safetensors"), old_adapter)
        assert _same(_base_state(target, tmp_path / "base-old"), old_checkpoint[1])
        assert _debris(target) == []

        model.save_pretrained(target, save_base_model=True)
        assert _same(load_file(target / "adapter_model.safetensors"),
                     load_file(tmp_path / "new" / "adapter_model.safetensors"))
        assert _same(_base_state(target, tmp_path / "base-new"), new_state)
        assert _debris(target) == []
    finally:
        model.delete_adapter("both")


# -------------------------------------------------------------------------------------- kill -9
CHILD = r"""
import sys
from sglang_hf_bridge import SGLangRobertaForMaskedLM
model = SGLangRobertaForMaskedLM.from_pretrained(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
while True:
    print("saving", flush=True)
    model.save_pretrained(sys.argv[2])
"""


class _Child:
    """A process that loads the engine, waits for a line on stdin, then saves in a loop."""

    def __init__(self, source: Path, target: Path, log: Path):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, str(source), str(target)], cwd=log.parent,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "wb"),
                                     text=True, env=env)
        self.lines: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("<eof>")

    def wait_for(self, word: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = "<timeout>"
            if line == word:
                return
            if line in ("<eof>", "<timeout>"):
                tail = self.log.read_text(errors="replace")[-3000:]
                raise AssertionError(f"child: {line} while waiting for {word!r}\n{tail}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def test_kill_9_mid_save_leaves_old_or_new(roberta, roberta_checkpoint, old_checkpoint, new_state, tmp_path):
    """SIGKILL a saving process at random instants: every time, the directory loads in
    transformers and holds the old weights or the new ones; the next save removes what the dead
    one left behind. Children start two at a time so their engine start-ups overlap."""
    _, model = roberta
    rng = random.Random(1234)
    target = tmp_path / "out"
    kills, outcomes, children, dead = 4, [], [], []
    try:
        children = [_Child(roberta_checkpoint[0], target, tmp_path / "child-0.log")]
        for k in range(kills):
            if k + 1 < kills:
                children.append(_Child(roberta_checkpoint[0], target, tmp_path / f"child-{k + 1}.log"))
            child = children[k]
            child.wait_for("ready", timeout=240)
            if target.exists():
                shutil.rmtree(target)  # back to the old checkpoint; a dead save's siblings stay
            shutil.copytree(old_checkpoint[0], target)
            files = _add_user_files(target)
            child.proc.stdin.write("go\n")
            child.proc.stdin.flush()
            child.wait_for("saving", timeout=60)
            time.sleep(rng.uniform(0.0, 0.12))  # the first save takes ~50-100 ms: hit it and later ones
            child.kill()
            dead.append(child.proc.pid)
            state = _state(target)
            outcome = "old" if _same(state, old_checkpoint[1]) else "new" if _same(state, new_state) else None
            assert outcome, f"kill {k}: the directory holds neither the old nor the new weights"
            outcomes.append(outcome)
            _assert_files(target, files)
            pids = {int(m.group(2)) for m in map(LEFTOVER.search, os.listdir(tmp_path)) if m}
            assert pids <= set(dead[-2:]), f"kill {k}: leftovers of older saves {pids} were not cleaned up"
        model.save_pretrained(target)  # a live save cleans up after every dead one
        assert _same(_state(target), new_state)
        assert _debris(target) == []
    finally:
        for child in children:
            child.kill()
    print("kill outcomes:", outcomes)


# ------------------------------------------------------------------------ atomic_dir on its own
def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def target(tmp_path) -> Path:
    t = tmp_path / "ckpt"
    (t / "sub").mkdir(parents=True)
    (t / "config.json").write_text("old config")
    (t / "pytorch_model.bin").write_text("old weights")
    (t / "notes.txt").write_text("keep me")
    (t / "sub" / "config.json").write_text("not top-level: kept")
    return t


def _save(target, replaces=MODEL_FILES, **files) -> None:
    with replacing_directory(target, replaces=replaces) as staging:
        assert not os.listdir(staging)  # the writer starts in an empty directory
        for name, text in files.items():
            Path(staging, name.replace("__", ".")).write_text(text)


EXPECTED = {"config.json": b"new", "model.safetensors": b"new weights", "notes.txt": b"keep me",
            "sub/config.json": b"not top-level: kept"}


def test_exchange_swaps_in_one_step(target, monkeypatch):
    calls = []
    real = atomic_dir._exchange
    monkeypatch.setattr(atomic_dir, "_exchange", lambda a, b: (calls.append((a, b)), real(a, b)))
    witness = target.parent / "witness"
    os.link(target / "notes.txt", witness)  # a second name for the target's inode
    _save(target, config__json="new", model__safetensors="new weights", notes__txt="rewritten by the save")
    assert len(calls) == 1 and calls[0][1] == str(target)
    assert _tree(target) == {**EXPECTED, "notes.txt": b"rewritten by the save"}  # the writer's file wins
    assert witness.read_text() == "keep me"  # ...without writing into the old directory's file
    assert sorted(os.listdir(target.parent)) == ["ckpt", "witness"]


def test_saving_into_the_working_directory(target, monkeypatch):
    monkeypatch.chdir(target / "sub")
    _save(Path(".."), config__json="new", model__safetensors="new weights")
    assert os.getcwd() == str(target / "sub")  # not left in the deleted old directory
    assert Path("../config.json").read_text() == "new" and Path("config.json").exists()


def test_fallback_without_renameat2(target, monkeypatch):
    def unavailable(a, b):
        raise OSError(errno.ENOSYS, "renameat2 is not available")

    monkeypatch.setattr(atomic_dir, "_exchange", unavailable)
    _save(target, config__json="new", model__safetensors="new weights")
    assert _tree(target) == EXPECTED
    assert os.listdir(target.parent) == ["ckpt"]


def test_failed_save_leaves_target_untouched(target):
    before = _tree(target)
    with pytest.raises(KeyboardInterrupt):
        with replacing_directory(target, replaces=MODEL_FILES) as staging:
            Path(staging, "config.json").write_text("half")
            raise KeyboardInterrupt
    assert _tree(target) == before
    assert os.listdir(target.parent) == ["ckpt"]


def test_adapter_save_keeps_model_files(target):
    _save(target, replaces=ADAPTER_FILES, adapter_config__json="{}")
    assert _tree(target)["config.json"] == b"old config" and _tree(target)["pytorch_model.bin"] == b"old weights"


def test_leftovers_of_dead_saves_removed_live_kept(target):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = _dead_pid()
        for pid, kind in ((dead, "saving"), (dead, "old"), (live.pid, "saving")):
            leftover = target.parent / f".ckpt.{kind}-{pid}-0badcafe"
            leftover.mkdir()
            (leftover / "model.safetensors").write_text("half")
        _save(target, config__json="new", model__safetensors="new weights")
        assert sorted(os.listdir(target.parent)) == sorted(["ckpt", f".ckpt.saving-{live.pid}-0badcafe"])
        assert _tree(target) == EXPECTED
    finally:
        live.kill()
        live.wait()
    cleanup_leftovers(target)
    assert os.listdir(target.parent) == ["ckpt"]


def test_killed_between_fallback_renames_restores_old(target):
    """The fallback's window: the old directory renamed away, the new one not yet in place."""
    dead = _dead_pid()
    before = _tree(target)
    os.rename(target, target.parent / f".ckpt.old-{dead}-0badcafe")
    (target.parent / f".ckpt.saving-{dead}-0badcafe").mkdir()
    cleanup_leftovers(target)
    assert _tree(target) == before
    assert os.listdir(target.parent) == ["ckpt"]


def test_copies_where_hard_links_are_refused(target, monkeypatch):
    def no_links(*args, **kwargs):
        raise OSError(errno.EXDEV, "cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    _save(target, config__json="new", model__safetensors="new weights")
    assert _tree(target) == EXPECTED


def test_mount_point_replaces_file_by_file(target, monkeypatch):
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: p == str(target) or real(p))
    _save(target, config__json="new", model__safetensors="new weights")
    assert _tree(target) == EXPECTED
    assert os.listdir(target.parent) == ["ckpt"]


def test_file_target_raises(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        _save(tmp_path / "f", config__json="new")
    assert (tmp_path / "f").read_text() == "x"
