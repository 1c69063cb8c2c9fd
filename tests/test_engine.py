"""Engine behaviour: pools, no prefix reuse, model lifecycles, several models in one process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO, assert_pools_free, build_checkpoint, max_abs_diff

from sglang_hf_bridge import InferenceOnlyError, InputValidationError, SGLangRobertaForMaskedLM


def test_thousand_calls_leave_pools_as_they_were(roberta):
    hf, model = roberta
    torch.manual_seed(0)
    ids = torch.randint(3, 50265, (3, 9))
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [1] * 2 + [0] * 7])
    for i in range(1000):
        if i % 100 == 0:
            with pytest.raises(InputValidationError):
                model(torch.tensor([[0, 99999, 2]]))
        if i % 2:
            model.compute_mlm_logits(ids, mask, positions=[[0, 1], [2, 1]], vocab_ids=[372, 6587])
        else:
            with torch.no_grad():
                model(ids, attention_mask=mask)
    assert_pools_free(model)
    with torch.no_grad():
        assert max_abs_diff(model(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits) <= 1e-5


@pytest.fixture(scope="module")
def roberta_backend(roberta, roberta_checkpoint):
    """The same weights on SGLang's attention backend: K/V go through the KV pool, the path where
    prefix reuse could happen at all (the default ``sdpa`` path keeps no K/V)."""
    from sglang_hf_bridge import SGLangRobertaForMaskedLM

    model = SGLangRobertaForMaskedLM.from_pretrained(roberta_checkpoint[0], encoder_attention="backend")
    yield roberta[0], model
    model.close()


def test_engine_never_reuses_a_shared_prefix(roberta_backend):
    """Sequences sharing a long prefix with earlier ones must be computed from scratch: for a
    bidirectional encoder every prefix token's K/V depends on the tokens after it."""
    hf, model = roberta_backend
    assert model.runtime.config.encoder_attention == "backend"
    mr = model.runtime.model_runner
    assert mr.server_args.disable_radix_cache
    torch.manual_seed(3)
    prefix = torch.randint(3, 50265, (100,)).tolist()
    first = [0] + prefix + [2]
    later = [[0] + prefix + tail + [2] for tail in ([7], [8, 9], [10, 11, 12])]
    with torch.no_grad():
        model(torch.tensor([first]))  # fills the KV pool with the shared prefix
        for seq in later:  # one call each, after the prefix was seen
            ids = torch.tensor([seq])
            assert max_abs_diff(model(ids).logits, hf(ids).logits) <= 1e-5
        # and all together in one batch, prefix-sharing rows side by side
        width = max(len(s) for s in later)
        ids = torch.tensor([s + [1] * (width - len(s)) for s in later])
        mask = (ids != 1).long()
        assert max_abs_diff(model(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits) <= 1e-5
    assert_pools_free(model)


def test_close_then_load_another_and_context_manager(tmp_path):
    hf_a = build_checkpoint(tmp_path / "a", "roberta", seed=1)
    hf_b = build_checkpoint(tmp_path / "b", "xlm-roberta", seed=2, hidden_size=48, num_attention_heads=3)
    ids = torch.tensor([[0, 5, 6, 7, 2]])
    for _ in range(2):
        with SGLangRobertaForMaskedLM.from_pretrained(tmp_path / "a") as a:
            assert max_abs_diff(a(ids).logits, hf_a(ids).logits) <= 1e-5
        with pytest.raises(RuntimeError, match="no running engine"):
            a(ids)
        b = SGLangRobertaForMaskedLM.from_pretrained(tmp_path / "b")
        assert max_abs_diff(b(ids).logits, hf_b(ids).logits) <= 1e-5
        b.close()
        b.close()  # idempotent


def test_two_different_models_alive_at_once(tmp_path, roberta):
    hf_a, a = roberta
    hf_b = build_checkpoint(tmp_path / "b", "camembert", seed=5, vocab_size=32005, hidden_size=40,
                            num_attention_heads=5, num_hidden_layers=3, max_position_embeddings=70)
    ids = torch.tensor([[0, 5, 6, 7, 2], [0, 8, 9, 2, 1]])
    mask = (ids != 1).long()
    with SGLangRobertaForMaskedLM.from_pretrained(tmp_path / "b", max_num_tokens=256) as b:
        for _ in range(3):  # interleaved calls: teacher / student style
            with torch.no_grad():
                assert max_abs_diff(a(ids, attention_mask=mask).logits, hf_a(ids, attention_mask=mask).logits) <= 1e-5
                assert max_abs_diff(b(ids, attention_mask=mask).logits, hf_b(ids, attention_mask=mask).logits) <= 1e-5
        assert_pools_free(b)
    assert_pools_free(a)
    with torch.no_grad():
        assert max_abs_diff(a(ids, attention_mask=mask).logits, hf_a(ids, attention_mask=mask).logits) <= 1e-5


def test_backward_explains_inference_only(roberta):
    _, model = roberta
    ids = torch.tensor([[0, 5, 6, 2]])
    out = model(ids, labels=ids)
    with pytest.raises(InferenceOnlyError, match="inference-only"):
        out.loss.backward()
    with torch.no_grad():
        assert not model(ids).logits.requires_grad


def test_torch_surface(roberta):
    _, model = roberta
    assert model.device == torch.device("cpu")
    assert model.dtype == torch.float32
    assert model.config.model_type == "roberta"
    assert model.eval() is model and not model.training
    assert model.train() is model and model.training
    model.eval()
    assert model.to("cpu") is model


def _run(code: str, env_extra=None, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + str(REPO / "tests"))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=str(REPO))


LOAD_AND_RUN = """
    import sys, tempfile, torch
    from conftest import build_checkpoint
    from sglang_hf_bridge import SGLangRobertaForMaskedLM
    d = tempfile.mkdtemp()
    build_checkpoint(__import__("pathlib").Path(d), "roberta")
    m = SGLangRobertaForMaskedLM.from_pretrained(d)
    print(m(torch.tensor([[0, 5, 2]])).logits.shape)
    # no close(): interpreter exit must not hang or leave anything behind
"""


def test_quiet_at_default_verbosity_and_exits_cleanly():
    r = _run(LOAD_AND_RUN)
    assert r.returncode == 0, r.stderr
    assert "torch.Size([1, 3, 50265])" in r.stdout
    noisy = [ln for ln in r.stderr.splitlines() if ln.strip() and "Writing model shards" not in ln]
    assert noisy == [], noisy


def test_sglang_logs_show_at_info_verbosity():
    r = _run(LOAD_AND_RUN, {"TRANSFORMERS_VERBOSITY": "info"})
    assert r.returncode == 0, r.stderr
    assert "Cuda graph is disabled" in r.stderr, r.stderr[-2000:]
