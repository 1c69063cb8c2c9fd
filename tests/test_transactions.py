"""State changes happen whole or not at all: an exception or KeyboardInterrupt injected at every
step (every call of a function of this package) of load_adapter, add_adapter, delete_adapter,
set_adapter, the cache switches and MeZO's in-place operations leaves the model in the state
before or after the operation -- adapter table, engine pool, SGLang's registry, weights -- and
usable. Injection is deterministic (a trace function raising at the k-th call), not timing luck."""

from __future__ import annotations

import copy
import signal
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_checkpoint, max_abs_diff
from peft import LoraConfig, get_peft_model

import sglang_hf_bridge
from sglang_hf_bridge import SGLangRobertaForMaskedLM, compat
from sglang_hf_bridge.engine import hf_parameter_slices
from sglang_hf_bridge.training.zo import EngineAdapterTarget, EngineWeightsTarget

PACKAGE = str(Path(sglang_hf_bridge.__file__).parent)
MAX_POINTS = 120  # injection points per operation (evenly spread when an operation has more calls)
IDS = torch.tensor([[0, 5, 6, 50264, 2], [0, 9, 50264, 2, 1]])
MASK = (IDS != 1).long()


class FaultAt:
    """At the ``k``-th call of a function defined in this package (this thread), once: deliver a
    real SIGINT (``exc=KeyboardInterrupt``: exactly what Ctrl-C does, honoured or held back by
    whatever handler is installed at that moment), or raise ``exc`` from that function when this
    package called it (a failure of one of our own steps). ``k=None`` only counts the calls."""

    def __init__(self, k=None, exc=KeyboardInterrupt):
        self.k, self.exc, self.calls, self.fired = k, exc, 0, False

    def _trace(self, frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(PACKAGE):
            self.calls += 1
            if self.calls == self.k:
                sys.settrace(None)
                self.fired = True
                if self.exc is KeyboardInterrupt:
                    signal.raise_signal(signal.SIGINT)
                elif frame.f_back is not None and frame.f_back.f_code.co_filename.startswith(PACKAGE):
                    raise self.exc(f"injected at call {self.k} ({frame.f_code.co_name})")
        return None

    def __enter__(self):
        sys.settrace(self._trace)
        return self

    def __exit__(self, *exc):
        sys.settrace(None)
        return False


def points(n: int):
    if n <= MAX_POINTS:
        return list(range(1, n + 1))
    return sorted({1 + round(i * (n - 1) / (MAX_POINTS - 1)) for i in range(MAX_POINTS)})


def snapshot(model):
    """Everything a state change may touch, and a check that the layers agree with each other."""
    runtime = model.runtime
    table = {n: a.lora_id for n, a in model._adapter_state().items()}
    engine = sorted(runtime.adapters.adapters)
    sglang = sorted(compat.lora_manager(runtime.model_runner).lora_refs)
    assert sorted(table.values()) == engine == sorted(runtime.adapters._lora_refs) == sglang, (table, engine, sglang)
    assert model.engine_pool_stats() == model.engine_pool_capacity()
    stats = model.cache_stats()
    return {"adapters": sorted(table), "active": model.active_adapters(),
            "result_cache": stats["result"] is not None,
            "frozen_layer": stats["frozen_layer"]["layer"] if stats["frozen_layer"] else None}


def label_logits(model, names=None):
    return model.compute_mlm_logits(IDS, MASK, vocab_ids=[5, 6, 7], adapter_names=names)


def run_with_faults(model, operation, undo, exc=KeyboardInterrupt):
    """Run ``operation`` with a fault at each injection point; after each, the state must be the
    one before or the one after, consistent, and the model must still answer."""
    before = snapshot(model)
    with FaultAt() as counter:
        operation()
    after = snapshot(model)
    undo()
    assert snapshot(model) == before
    outcomes = {"before": 0, "after": 0, "fired": 0}
    ks = points(counter.calls)
    for k in ks:
        fault = FaultAt(k, exc)
        try:
            with fault:
                operation()
        except exc:
            pass
        outcomes["fired"] += fault.fired  # a run can make a few calls fewer (one-time set-up)
        state = snapshot(model)
        assert state in (before, after), (k, state)
        outcomes["before" if state == before else "after"] += 1
        label_logits(model)  # still usable
        if state == after:
            undo()
    assert snapshot(model) == before
    assert outcomes["fired"] >= 0.9 * len(ks)
    return counter.calls, outcomes


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("transactions")
    hf = build_checkpoint(path, "roberta", seed=60)
    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                               init_lora_weights=False))
    peft_model.save_pretrained(path / "adapter")
    model = SGLangRobertaForMaskedLM.from_pretrained(path, max_loras=4)
    yield model, path / "adapter"
    model.close()


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_load_and_delete_adapter_are_transactions(setup, exc):
    model, adapter_dir = setup
    reference = None

    def load():
        model.load_adapter(adapter_dir, adapter_name="x")

    def delete():
        model.delete_adapter("x")

    calls, outcomes = run_with_faults(model, load, delete, exc)
    assert calls > 20 and outcomes["before"] > 0
    load()
    reference = label_logits(model, ["x", "x"])
    calls, outcomes = run_with_faults(model, delete, load, exc)
    assert calls > 5
    if "x" not in model.peft_config:
        load()
    assert max_abs_diff(label_logits(model, ["x", "x"]), reference) == 0.0  # the same adapter, intact
    delete()


def test_add_and_set_adapter_are_transactions(setup):
    model, adapter_dir = setup
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["value"])
    model.load_adapter(adapter_dir, adapter_name="first")
    try:
        run_with_faults(model, lambda: model.add_adapter(config, adapter_name="y"), lambda: model.delete_adapter("y"))
        model.add_adapter(config, adapter_name="y")
        run_with_faults(model, lambda: model.set_adapter("first"), lambda: model.set_adapter("y"))
        model.delete_adapter("y")
    finally:
        model.delete_adapter("first")


def test_cache_switches_are_transactions(setup):
    model, _ = setup
    run_with_faults(model, lambda: model.enable_result_cache(8), model.disable_result_cache)
    run_with_faults(model, lambda: model.enable_frozen_layer_cache(1, 8), model.disable_frozen_layer_cache)
    model.enable_frozen_layer_cache(1, 8)
    run_with_faults(model, model.disable_frozen_layer_cache, lambda: model.enable_frozen_layer_cache(1, 8))
    model.disable_frozen_layer_cache()


def _weights(model):
    return {n: s.view.clone() for n, s in hf_parameter_slices(model.runtime.model).items()}


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("kind", ["weights", "adapter"])
def test_mezo_in_place_operations_are_whole(setup, kind, exc):
    """A perturbation interrupted anywhere leaves every trained tensor at theta or every one at
    theta + eps z (never a mix), and the model answers for that state."""
    model, adapter_dir = setup
    if kind == "adapter":
        model.load_adapter(adapter_dir, adapter_name="z")
        target = EngineAdapterTarget(model, "z")
        read = lambda: dict(model.adapter_state_dict("z"))  # noqa: E731
    else:
        target = EngineWeightsTarget(model, lambda n: ".layer.1." in n or n.startswith("lm_head."))
        read = lambda: {n: t for n, t in _weights(model).items() if n in target.names}  # noqa: E731
    try:
        theta = read()
        target.perturb(11, 1e-2)
        moved = read()
        target.perturb(11, -1e-2)
        with FaultAt() as counter:
            target.perturb(11, 1e-2)
        target.perturb(11, -1e-2)
        seen = set()
        for k in points(counter.calls):
            fault = FaultAt(k, exc)
            try:
                with fault:
                    target.perturb(11, 1e-2)
            except exc:
                pass
            now = read()
            at_theta = all(max_abs_diff(now[n], theta[n]) <= 1e-4 for n in theta)  # eps z ~ 1e-2 apart
            at_moved = all(max_abs_diff(now[n], moved[n]) <= 1e-4 for n in theta)
            assert at_theta or at_moved, k
            seen.add("theta" if at_theta else "moved")
            if at_moved:
                target.perturb(11, -1e-2)
        if exc is RuntimeError:  # failures before the first tensor changed leave theta
            assert "theta" in seen
        label_logits(model)
    finally:
        if kind == "adapter":
            model.delete_adapter("z")


def test_faults_leave_torch_unpatched(setup):
    """Last in the module, after hundreds of injected faults: the engine's no-pinning patch of
    ``Tensor.pin_memory`` (a GPU-less host) is undone, also when a fault landed as a block was
    left (it used to stay patched for the rest of the process)."""
    assert compat._pinning["depth"] == 0
    assert torch.Tensor.pin_memory is torch._C.TensorBase.pin_memory
