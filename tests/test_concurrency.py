"""Many callers, one engine: threads calling forward / compute_mlm_logits / the pipeline / the
adapter methods on one model get the single-threaded answers, share engine passes, leak nothing."""

from __future__ import annotations

import copy
import random
import threading
import time

import pytest
import torch
from conftest import assert_pools_free, build_checkpoint, fill_mask_answers, max_abs_diff
from peft import LoraConfig, get_peft_model
from transformers import pipeline

from sglang_hf_bridge import AdapterError, InputValidationError, SGLangRobertaForMaskedLM

TOL = 1e-5
THREADS = 4
SECONDS = 6.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("concurrency")
    hf = build_checkpoint(path, "roberta", seed=50)
    adapters = {}
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(i)
        peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                                   init_lora_weights=False))
        peft_model.save_pretrained(path / f"adapter-{name}")
        adapters[name] = path / f"adapter-{name}"
    model = SGLangRobertaForMaskedLM.from_pretrained(path, max_loras=4)
    yield model, adapters
    model.close()


def _inputs(rng: random.Random):
    rows = rng.randint(1, 3)
    lengths = [rng.randint(2, 12) for _ in range(rows)]
    T = max(lengths)
    ids = torch.full((rows, T), 1, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.tensor([0] + [rng.randint(3, 999) for _ in range(n - 2)] + [2])
        if n > 3:
            ids[r, rng.randint(1, n - 2)] = 50264  # <mask>
    return ids, (ids != 1).long()


def _work(model, ids, mask, kind, adapter_names=None):
    if kind == "forward":
        with torch.no_grad():
            return model(ids, attention_mask=mask, adapter_names=adapter_names).logits
    positions = mask.bool()
    return model.compute_mlm_logits(ids, mask, positions=positions, vocab_ids=[5, 50, 500],
                                    adapter_names=adapter_names)


def _churn(model, adapter_dir, stop, errors):
    """Load and delete adapter "b" until ``stop`` (a thread's body; errors are collected)."""
    try:
        while time.monotonic() < stop:
            model.load_adapter(adapter_dir, adapter_name="b")
            model.delete_adapter("b")
    except BaseException as e:  # noqa: BLE001
        errors.append(e)


def test_threads_get_single_threaded_answers_and_share_passes(setup):
    model, adapters = setup
    model.load_adapter(adapters["a"], adapter_name="a")
    try:
        rng = random.Random(0)
        jobs = []
        for i in range(48):
            ids, mask = _inputs(rng)
            kind = ("forward", "mlm")[i % 2]
            names = [("a", "__base__")[(i + r) % 2] for r in range(ids.shape[0])]
            jobs.append((ids, mask, kind, names))
        oracle = [_work(model, *job[:3], adapter_names=job[3]) for job in jobs]
        passes_before, merged_before = model.runtime.batcher.passes, model.runtime.batcher.merged_calls
        results, errors = {}, []

        def worker(k):
            try:
                for j in range(k, len(jobs), THREADS):
                    results[j] = _work(model, *jobs[j][:3], adapter_names=jobs[j][3])
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert len(results) == len(jobs)
        for j, expected in enumerate(oracle):
            assert max_abs_diff(results[j], expected) <= TOL, j
        assert model.runtime.batcher.merged_calls > merged_before  # calls really shared passes
        assert model.runtime.batcher.passes - passes_before < len(jobs)
        assert_pools_free(model)
    finally:
        model.delete_adapter("a")


def test_one_callers_bad_input_fails_only_that_caller(setup):
    model, _ = setup
    ids, mask = _inputs(random.Random(1))
    expected = _work(model, ids, mask, "forward")
    outcomes = {}
    barrier = threading.Barrier(THREADS)

    def good(k):
        barrier.wait()
        outcomes[k] = _work(model, ids, mask, "forward")

    def bad(k):
        barrier.wait()
        try:
            model(torch.tensor([[0, 10**6, 2]]))
        except InputValidationError as e:
            outcomes[k] = e

    threads = [threading.Thread(target=bad if k == 0 else good, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert isinstance(outcomes[0], InputValidationError)
    assert all(max_abs_diff(outcomes[k], expected) <= TOL for k in range(1, THREADS))
    assert_pools_free(model)


def test_adapter_churn_while_threads_run(setup):
    """Load/delete on one thread while others run with adapter_names: every answer is either the
    adapter's (it was loaded for that pass) or a clear AdapterError; pools and tables stay right."""
    model, adapters = setup
    model.load_adapter(adapters["a"], adapter_name="a")
    ids, mask = _inputs(random.Random(2))
    expected_a = _work(model, ids, mask, "mlm", adapter_names=["a"] * ids.shape[0])
    expected_base = _work(model, ids, mask, "mlm", adapter_names=["__base__"] * ids.shape[0])
    stop = time.monotonic() + SECONDS
    errors, answers = [], []


    def caller():
        try:
            while time.monotonic() < stop:
                answers.append(("a", _work(model, ids, mask, "mlm", adapter_names=["a"] * ids.shape[0])))
                answers.append(("base", _work(model, ids, mask, "mlm", adapter_names=["__base__"] * ids.shape[0])))
                try:
                    _work(model, ids, mask, "mlm", adapter_names=["b"] * ids.shape[0])
                except (AdapterError, ValueError):
                    pass  # "b" may be gone: a clear error, never a wrong answer
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=_churn, args=(model, adapters["b"], stop, errors))]
    threads += [threading.Thread(target=caller) for _ in range(THREADS - 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    try:
        assert not errors, errors
        assert answers
        for which, got in answers:
            assert max_abs_diff(got, expected_a if which == "a" else expected_base) <= TOL
        assert sorted(model.peft_config) == ["a"]
        assert len(model.runtime.adapters.adapters) == 1
        assert_pools_free(model)
        free = model.engine_pool_stats()
        assert free == model.engine_pool_capacity()  # never more free slots than exist
    finally:
        model.delete_adapter("a")


def test_pipeline_from_threads(setup, tokenizer):
    model, _ = setup
    fill = pipeline("fill-mask", model=model, tokenizer=tokenizer)
    texts = ["The movie was <mask>.", "A <mask> film.", "I <mask> it.", "<mask> and more <mask>."]
    oracle = [fill(t, top_k=3) for t in texts]
    results, errors = {}, []

    def worker(k):
        try:
            for _ in range(3):
                results[k] = fill(texts[k], top_k=3)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors

    assert all(fill_mask_answers(results[k]) == fill_mask_answers(oracle[k]) for k in range(len(texts)))
    assert_pools_free(model)


def test_stress_threads_interrupts_and_adapter_churn(setup):
    """The CI stress test: worker threads on mixed adapter rows, an adapter load/delete thread,
    and Ctrl-C (real SIGINTs) landing at random moments in the main thread's calls -- every answer
    equals the single-threaded oracle, nothing leaks, the tables agree, and the model stays healthy."""
    import signal

    model, adapters = setup
    model.load_adapter(adapters["a"], adapter_name="a")
    rng = random.Random(7)
    jobs = [(*_inputs(rng), kind) for kind in ("forward", "mlm") for _ in range(6)]
    names = lambda ids: [("a", "__base__")[r % 2] for r in range(ids.shape[0])]  # noqa: E731
    oracle = [_work(model, ids, mask, kind, names(ids)) for ids, mask, kind in jobs]
    stop = time.monotonic() + SECONDS
    errors, checked = [], [0]
    state = {"armed": False, "interrupts": 0, "sent": 0}

    def on_sigint(signum, frame):  # Ctrl-C's behaviour, but only inside the main loop's try
        if state["armed"]:
            state["interrupts"] += 1
            raise KeyboardInterrupt

    def check(j):
        got = _work(model, *jobs[j][:3], names(jobs[j][0]))
        if max_abs_diff(got, oracle[j]) > TOL:
            errors.append(AssertionError(f"job {j} wrong"))
        checked[0] += 1

    def worker(k):
        try:
            j = k
            while time.monotonic() < stop:
                check(j % len(jobs))
                j += 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)


    def interrupter():
        r = random.Random(3)
        while time.monotonic() < stop:
            time.sleep(r.uniform(0.02, 0.15))
            if state["armed"]:
                state["sent"] += 1
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, on_sigint)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    threads += [threading.Thread(target=_churn, args=(model, adapters["b"], stop, errors)),
                threading.Thread(target=interrupter)]
    try:
        for t in threads:
            t.start()
        j = 0
        while time.monotonic() < stop:
            try:
                state["armed"] = True
                check(j % len(jobs))
            except KeyboardInterrupt:
                pass
            finally:
                state["armed"] = False
            j += 1
        for t in threads:
            t.join(120)
    finally:
        state["armed"] = False
        signal.signal(signal.SIGINT, previous)
    try:
        assert not errors, errors[:3]
        assert state["interrupts"] > 5 and checked[0] > 20, (state, checked)
        assert_pools_free(model)
        assert sorted(model.peft_config) == ["a"] and len(model.runtime.adapters.adapters) == 1
        for j, expected in enumerate(oracle):  # healthy afterwards
            assert max_abs_diff(_work(model, *jobs[j][:3], names(jobs[j][0])), expected) <= TOL
    finally:
        model.delete_adapter("a")
