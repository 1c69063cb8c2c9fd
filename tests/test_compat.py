"""Each SGLang 0.5.23 workaround in ``sglang_hf_bridge.compat`` next to the behaviour it avoids."""

from __future__ import annotations

import pytest
import torch
from conftest import max_abs_diff
from test_engine import _run

from sglang_hf_bridge import SGLangRobertaForMaskedLM, compat
from sglang_hf_bridge.engine.config import EngineConfig
from sglang_hf_bridge.errors import SGLangLayoutError
from sglang_hf_bridge.process import free_local_port


def test_sglang_builds_its_parallel_runtime_only_once_per_process(roberta, roberta_checkpoint):
    """The bug: a second ``init_parallel_runtime`` in one process raises. The workaround shares
    one runtime between single-rank engines (reference counted)."""
    from sglang.srt.distributed import bootstrap

    _, model = roberta  # a live engine holds the runtime
    server_args = model.runtime.model_runner.server_args
    with pytest.raises(RuntimeError, match="ran twice"):
        bootstrap.init_parallel_runtime(server_args=server_args, device="cpu", dist_port=free_local_port())
    path, hf = roberta_checkpoint
    with SGLangRobertaForMaskedLM.from_pretrained(path) as second:  # works thanks to the sharing
        ids = torch.tensor([[0, 5, 6, 2]])
        assert max_abs_diff(second(ids).logits, hf(ids).logits) <= 1e-5
    assert compat._parallel_users["count"] >= 1  # the first model still holds it


def test_default_mem_fraction_fails_on_a_cpu_host():
    """The bug: on CPU, SGLang sizes its default mem_fraction_static from the host's RAM per NUMA
    node minus a reserve of ~25 GB (1.5 MB per prefill token); on a 24 GiB host (ours, the
    project's CI) it resolves negative and the KV pool cannot be allocated. ``compat.cpu_server_args``
    pins a fraction. The host size is fixed here so the test shows the bug on any machine."""
    assert compat.cpu_server_args()["mem_fraction_static"] > 0
    r = _run("""
        import tempfile, pathlib
        import sglang.srt.arg_groups.memory_hook as memory_hook
        memory_hook.get_device_memory_capacity = lambda device=None: 24.0 * 1024  # MB, a 24 GiB host
        from conftest import build_checkpoint
        from sglang_hf_bridge import SGLangRobertaForMaskedLM
        d = pathlib.Path(tempfile.mkdtemp())
        build_checkpoint(d, "roberta")
        SGLangRobertaForMaskedLM.from_pretrained(d, mem_fraction_static=None)
    """)
    assert r.returncode != 0
    assert "leave no GPU memory for the KV cache under --mem-fraction-static=-" in r.stderr


def test_sglang_leaves_prefix_reuse_on_for_encoders_so_the_engine_turns_it_off(tmp_path):
    """The bug: ``ServerArgs(is_embedding=True)`` keeps the radix cache and chunked prefill on,
    both wrong for a bidirectional encoder. The engine config turns both off."""
    from conftest import build_checkpoint
    from sglang.srt.server_args import ServerArgs

    build_checkpoint(tmp_path, "roberta")
    stock = ServerArgs(model_path=str(tmp_path), is_embedding=True, device="cpu")
    assert stock.disable_radix_cache is False
    ours = EngineConfig(model_path=str(tmp_path), architecture="X").server_args_kwargs(dist_port=1)
    assert ours["disable_radix_cache"] is True and ours["chunked_prefill_size"] == -1


def test_cpu_engine_env_var_is_refused_before_start(roberta_checkpoint, monkeypatch):
    path, _ = roberta_checkpoint
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")
    with pytest.raises(RuntimeError, match="SGLANG_USE_CPU_ENGINE"):
        SGLangRobertaForMaskedLM.from_pretrained(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the bug needs a GPU-less host")
def test_lora_pinning_fails_on_gpu_less_host_and_the_fix_stays_narrow(roberta, roberta_checkpoint, tmp_path):
    """The bug: SGLang's LoRA code pins memory unconditionally, which raises without a GPU.
    The fix swaps ``torch`` inside two SGLang LoRA modules only and makes
    ``Tensor.pin_memory`` a no-op only while the engine runs."""
    import sglang.srt.lora.layers as lora_layers
    from transformers import RobertaForMaskedLM

    with pytest.raises(RuntimeError, match="NVIDIA driver"):
        torch.tensor([1.0], pin_memory=True)
    original = torch.Tensor.pin_memory
    _, model = roberta  # LoRA is on by default: the engine already ran its LoRA code
    assert isinstance(lora_layers.torch, compat._TorchWithoutPinning)
    with pytest.raises(RuntimeError, match="NVIDIA driver"):
        torch.zeros(2).pin_memory()  # outside the engine, pinning is untouched
    with compat.no_pinning():
        assert torch.Tensor.pin_memory is not original
        with compat.no_pinning():  # nested use restores only at the outermost exit
            pass
        assert torch.Tensor.pin_memory is not original
    assert torch.Tensor.pin_memory is original
    # HF loads in the same process are unaffected after engine LoRA work
    path, hf = roberta_checkpoint
    model.add_adapter(__import__("peft").LoraConfig(r=4, target_modules=["query"]), adapter_name="pin")
    model.delete_adapter("pin")
    again = RobertaForMaskedLM.from_pretrained(path).eval()
    ids = torch.tensor([[0, 5, 6, 2]])
    with torch.no_grad():
        assert max_abs_diff(again(ids).logits, hf(ids).logits) == 0.0


def test_cpu_tp_thread_binding_needed_without_numa_nodes(monkeypatch):
    """The bug: without SGLANG_CPU_OMP_THREADS_BIND, SGLang binds one TP rank per NUMA node and
    asserts ranks <= NUMA nodes (one node here). The TP environment gives each rank its cores."""
    from sglang.srt.utils import numa_utils

    monkeypatch.delenv("SGLANG_CPU_OMP_THREADS_BIND", raising=False)
    if len(numa_utils.get_cpu_ids_by_node()) >= 2:
        pytest.skip("this host has several NUMA nodes")
    with pytest.raises(AssertionError, match="SGLANG_CPU_OMP_THREADS_BIND is not set"):
        numa_utils.init_threads_binding(numa_index=0, world_size=2)
    env = compat.cpu_tensor_parallel_environment(2)
    assert len(env["SGLANG_CPU_OMP_THREADS_BIND"].split("|")) == 2
    monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", env["SGLANG_CPU_OMP_THREADS_BIND"])
    numa_utils.init_threads_binding(numa_index=0, world_size=2)  # no assertion now


@pytest.mark.skipif(torch.cuda.is_available(), reason="the bug needs a GPU-less host")
def test_pynccl_is_kept_off_on_cpu(monkeypatch):
    """The bug: with a CUDA build of torch, SGLang finds and loads libnccl for PyNccl even on a
    GPU-less host, and TP start-up then crashes ("Expected a cuda device"). Pointing
    SGLANG_NCCL_SO_PATH at a missing file makes the library load fail, so PyNccl stays off."""
    from sglang.srt.distributed.device_communicators.pynccl_wrapper import NCCLLibrary

    monkeypatch.delenv("SGLANG_NCCL_SO_PATH", raising=False)
    NCCLLibrary()  # loads: the stock path would go on to use NCCL on a CPU host
    monkeypatch.setenv("SGLANG_NCCL_SO_PATH", compat.cpu_tensor_parallel_environment(2)["SGLANG_NCCL_SO_PATH"])
    with pytest.raises(OSError, match="cannot open shared object file"):
        NCCLLibrary()


def test_base_only_batches_skip_the_lora_kernels(tmp_path):
    """SGLang runs LoRA kernels on batches where no row has an adapter (zero slots);
    ``compat.skip_lora_on_base_batches`` turns on its backend switch: base-only batches run no
    LoRA kernel, batches with adapter rows still do (and give PEFT's answers, see test_lora)."""
    import copy

    from conftest import build_checkpoint
    from peft import LoraConfig, get_peft_model

    hf = build_checkpoint(tmp_path, "roberta", seed=70)
    get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, lora_alpha=8, target_modules=["query"],
                                                 init_lora_weights=False)).save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[0, 5, 6, 7, 2]])
    with SGLangRobertaForMaskedLM.from_pretrained(tmp_path) as model:
        model.load_adapter(tmp_path / "adapter", adapter_name="a")
        backend = compat.lora_manager(model.runtime.model_runner).lora_backend
        assert backend.skip_inactive_lora_batches
        calls = {"n": 0}
        original = backend.run_qkv_lora

        def counting(*args, **kwargs):
            calls["n"] += 1
            return original(*args, **kwargs)

        backend.run_qkv_lora = counting
        try:
            base = model(ids, adapter_names=["__base__"]).logits
            assert calls["n"] == 0
            with_adapter = model(ids, adapter_names=["a"]).logits
            assert calls["n"] > 0
            backend.skip_inactive_lora_batches = False  # SGLang's default: the kernels run anyway
            calls["n"] = 0
            assert max_abs_diff(model(ids, adapter_names=["__base__"]).logits, base) == 0.0
            assert calls["n"] > 0
        finally:
            backend.run_qkv_lora = original
            backend.skip_inactive_lora_batches = True
        with torch.no_grad():
            assert max_abs_diff(base, hf(ids).logits) <= 1e-5
        assert max_abs_diff(with_adapter, base) > 1e-4


def test_kv_pool_is_backed_by_memory_nobody_reads_so_the_engine_gives_it_back(roberta_checkpoint):
    """The bug: SGLang backs every KV slot with memory (here 2 layers x K,V x 8,193 slots), also when
    the model computes attention itself (``encoder_attention="sdpa"``) and never touches it.
    ``compat.release_unread_kv_memory`` swaps each buffer for a same-shape ``meta`` tensor: the
    memory is gone, a read could not pass for numbers, answers and pool accounting are unchanged."""
    from conftest import assert_pools_free

    path, hf = roberta_checkpoint
    ids = torch.tensor([[0, 5, 6, 7, 2], [0, 8, 9, 2, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    with SGLangRobertaForMaskedLM.from_pretrained(path, encoder_attention="backend") as stock:
        pool = stock.runtime.model_runner.token_to_kv_pool
        backed = sum(t.untyped_storage().nbytes() for t in pool.k_buffer + pool.v_buffer)
        assert backed >= 2 * 2 * 8192 * hf.config.hidden_size * 4  # what SGLang holds
        freed = compat.release_unread_kv_memory(stock.runtime.model_runner)
        assert freed >= backed / 2  # K and V may share one allocation per layer
        assert all(t.is_meta for t in pool.k_buffer + pool.v_buffer)
        with pytest.raises((RuntimeError, NotImplementedError)):  # the backend path now reads nothing real
            stock(ids, attention_mask=mask)
    with SGLangRobertaForMaskedLM.from_pretrained(path) as model:  # sdpa on CPU: released at start
        pool = model.runtime.model_runner.token_to_kv_pool
        assert all(t.is_meta for t in pool.k_buffer + pool.v_buffer)
        assert max_abs_diff(model(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits) <= 1e-5
        assert_pools_free(model)


# --- accessors fail loudly when SGLang / torch are not laid out as this bridge expects -------------
def test_lora_manager_is_read_not_defaulted():
    """A runner without ``lora_manager`` raises (it would otherwise read as "LoRA disabled");
    ``None`` -- how 0.5.23 says LoRA is off -- is returned as is."""
    from types import SimpleNamespace

    with pytest.raises(SGLangLayoutError, match=r"SimpleNamespace\.lora_manager"):
        compat.lora_manager(SimpleNamespace())
    assert compat.lora_manager(SimpleNamespace(lora_manager=None)) is None


def test_lora_update_result_must_say_whether_it_succeeded():
    from types import SimpleNamespace

    from sglang.srt.managers.io_struct import LoRAUpdateOutput

    with pytest.raises(SGLangLayoutError, match=r"\.success"):
        compat.lora_update_error(SimpleNamespace(error_message=None))  # not a silent success
    assert compat.lora_update_error(LoRAUpdateOutput(success=True)) is None
    assert compat.lora_update_error(LoRAUpdateOutput(success=False, error_message="pool full")) == "pool full"
    assert compat.lora_update_error(LoRAUpdateOutput(success=False)) == "no reason given"


def test_lora_base_layer_decides_by_type_not_by_a_missing_attribute():
    """A LoRA wrapper whose base layer moved raises (its padded positions would lose their LoRA
    delta); an unwrapped layer is legitimate only while no adapter is active."""
    from sglang.srt.lora.layers import BaseLayerWithLoRA
    from torch import nn

    plain = nn.Linear(2, 2)
    wrapper = BaseLayerWithLoRA(plain, lora_backend=None)
    assert compat.lora_base_layer(wrapper, adapter_active=True) is plain
    assert compat.lora_base_layer(plain) is plain
    with pytest.raises(SGLangLayoutError, match="Linear is not wrapped"):
        compat.lora_base_layer(plain, adapter_active=True)
    del wrapper.base_layer
    with pytest.raises(SGLangLayoutError, match=r"BaseLayerWithLoRA\.base_layer"):
        compat.lora_base_layer(wrapper)


def test_pool_and_batch_accessors_name_what_is_missing():
    from types import SimpleNamespace

    with pytest.raises(SGLangLayoutError, match=r"\.req_to_token_pool"):
        compat.request_to_token_pool(SimpleNamespace(token_to_kv_pool_allocator=1))
    with pytest.raises(SGLangLayoutError, match=r"\.token_to_kv_pool_allocator"):
        compat.kv_slot_allocator(SimpleNamespace(req_to_token_pool=1))
    with pytest.raises(SGLangLayoutError, match=r"\.out_cache_loc"):
        compat.release_batch_kv_slots(SimpleNamespace(), None)
    freed = []
    allocator = SimpleNamespace(free=freed.append)
    batch = SimpleNamespace(out_cache_loc="slots")
    compat.release_batch_kv_slots(batch, allocator)
    compat.release_batch_kv_slots(batch, allocator)  # idempotent
    assert freed == ["slots"] and batch.out_cache_loc is None
    with pytest.raises(SGLangLayoutError, match=r"\.prefill_input_ids_cpu"):
        compat.move_prefill_ids_to_device(SimpleNamespace(input_ids=None))


def test_forward_output_must_be_the_models_pass_outputs():
    """Anything but the PassOutputs our model returned raises (no ``.embeddings`` guess)."""
    from types import SimpleNamespace

    from sglang_hf_bridge.sglang_models.forward_context import PassOutputs

    out = PassOutputs(hidden=torch.zeros(3, 4))
    assert compat.forward_outputs(SimpleNamespace(logits_output=out)) is out
    with pytest.raises(SGLangLayoutError, match=r"\.logits_output"):
        compat.forward_outputs(SimpleNamespace())
    with pytest.raises(SGLangLayoutError, match="logits_output is a Tensor"):
        compat.forward_outputs(SimpleNamespace(logits_output=out.hidden))


def test_vocab_shard_accessors_name_what_is_missing():
    from types import SimpleNamespace

    with pytest.raises(SGLangLayoutError, match=r"\.shard_indices"):
        compat.vocab_shard_range(SimpleNamespace())
    with pytest.raises(SGLangLayoutError, match=r"\.org_vocab_end_index"):
        compat.vocab_shard_range(SimpleNamespace(shard_indices=SimpleNamespace(org_vocab_start_index=0)))
    indices = SimpleNamespace(org_vocab_start_index=8, org_vocab_end_index=16)
    assert compat.vocab_shard_range(SimpleNamespace(shard_indices=indices)) == (8, 16)


def test_torch_private_accessors_name_what_is_missing(monkeypatch):
    import torch.distributed as dist

    assert compat.parse_to_arguments(torch.float16)[1] is torch.float16
    monkeypatch.delattr(torch._C._nn, "_parse_to")
    with pytest.raises(SGLangLayoutError, match="_parse_to"):
        compat.parse_to_arguments("cpu")
    monkeypatch.delattr(dist.distributed_c10d, "_get_default_group")
    with pytest.raises(SGLangLayoutError, match="_get_default_group"):
        compat.default_process_group()


def test_adapter_rollback_swallows_only_a_dead_engine():
    """``EncoderRuntime.discard_adapter`` used to swallow every exception; now only a dead worker
    or a closed engine (nothing left to undo) is skipped, with a debug log."""
    from types import SimpleNamespace

    from sglang_hf_bridge.engine.runtime import EncoderRuntime
    from sglang_hf_bridge.errors import EngineClosedError, WorkerError

    def failing(exc):
        def collective_rpc(*args):
            raise exc
        return SimpleNamespace(collective_rpc=collective_rpc)

    EncoderRuntime.discard_adapter(failing(WorkerError("rank 1 died")), "id")
    EncoderRuntime.discard_adapter(failing(EngineClosedError("closed")), "id")
    with pytest.raises(SGLangLayoutError):
        EncoderRuntime.discard_adapter(failing(SGLangLayoutError("layout")), "id")


def test_collective_timeouts_need_each_coordinators_groups(roberta, monkeypatch):
    """A group coordinator without ``device_group`` raises instead of being skipped (its groups
    would keep SGLang's two-hour timeout)."""
    from types import SimpleNamespace

    from sglang.srt.distributed import parallel_state

    _ = roberta  # a live engine: the parallel runtime exists
    fake = SimpleNamespace(cpu_group=None)
    monkeypatch.setitem(parallel_state._groups, "bridge-test-fake", lambda: fake)
    with pytest.raises(SGLangLayoutError, match=r"SimpleNamespace\.device_group"):
        compat.bound_collective_timeouts(60.0)


def test_accessors_read_the_live_engine(roberta):
    """The real engine path: every accessor finds SGLang 0.5.23's layout, and a forward (batch
    pools, KV slots, hidden states, LoRA-wrapped layers) gives HF's answers."""
    from conftest import assert_pools_free
    from sglang.srt.layers.linear import QKVParallelLinear

    hf, model = roberta
    mr = model.runtime.model_runner
    assert compat.lora_manager(mr) is not None  # LoRA is on by default
    assert compat.request_to_token_pool(mr) is mr.req_to_token_pool
    assert compat.kv_slot_allocator(mr) is mr.token_to_kv_pool_allocator
    emb = mr.model.lm_head.word_embeddings
    assert compat.vocab_shard_range(emb) == (0, hf.config.vocab_size)
    qkv = mr.model.layers[0].self_attn.qkv_proj
    assert isinstance(compat.lora_base_layer(qkv, adapter_active=True), QKVParallelLinear)
    assert compat.default_process_group() is not None
    ids = torch.tensor([[0, 5, 6, 7, 2], [0, 8, 9, 2, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits
    assert max_abs_diff(model(ids, attention_mask=mask).logits, expected) <= 1e-5
    assert_pools_free(model)


def test_collective_failure_is_decided_by_type_and_origin_not_by_message():
    """A user's RuntimeError that merely mentions "nccl" or "gloo" is not a broken TP group; a
    DistError is (a RuntimeError raised inside torch.distributed, gloo's way, runs for real in
    test_tp_security's stopped-peer test)."""
    import torch.distributed as dist

    def raise_here():
        raise RuntimeError("NCCL error: gloo connection closed by peer, timed out waiting")

    try:
        raise_here()
    except RuntimeError as e:
        assert not compat.is_collective_failure(e)
    assert compat.is_collective_failure(dist.DistBackendError("x"))
    assert not compat.is_collective_failure(ValueError("nccl"))


def test_engine_starts_leave_the_users_excepthook_alone(tmp_path):
    """torch's init_process_group (called by SGLang's parallel runtime) wraps sys.excepthook to
    prefix tracebacks with "[rank0]: ", once more on every start; the user's process keeps its own."""
    import sys

    from conftest import build_checkpoint

    from sglang_hf_bridge import SGLangRobertaForMaskedLM

    build_checkpoint(tmp_path, "roberta", vocab_size=100)
    SGLangRobertaForMaskedLM.from_pretrained(tmp_path, device="cpu", enable_lora=False).close()
    before = sys.excepthook  # after the first start: importing SGLang may install its own hook once
    for _ in range(2):
        SGLangRobertaForMaskedLM.from_pretrained(tmp_path, device="cpu", enable_lora=False).close()
    assert sys.excepthook is before
