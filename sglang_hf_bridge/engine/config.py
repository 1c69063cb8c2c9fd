"""Engine start-up options: a small dataclass turned into SGLang ``ServerArgs``."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from .. import compat
from ..sglang_models.families import ENCODER_CLASS
from ..sglang_models.weight_map import LORA_BASE_MODULES

DEFAULT_MAX_NUM_TOKENS = 8192
DEFAULT_MAX_RUNNING_REQUESTS = 256
# The KV pool's dtype when nothing reads it (encoder_attention="sdpa" on CPU). SGLang 0.5.23 fills
# every slot with zeros at start-up (torch.zeros: resident memory) before the engine can hand the
# buffers back (compat.release_unread_kv_memory): at the model's float32 that transient is 576 MiB
# for roberta-base at 8,192 tokens -- more than the weights -- and was the whole-process peak. The
# sdpa path never writes or reads the pool (attention runs on each pass's own q/k/v), so its dtype
# cannot change an answer; one byte per element makes the transient 4x smaller (docs/memory.md).
# Slots, and with them the token budget and the pools' accounting, are unchanged.
UNREAD_KV_CACHE_DTYPE = "fp8_e5m2"


# The shared secret of a tensor-parallel group (hex), for followers on other nodes.
AUTHKEY_ENV = "SGLANG_HF_BRIDGE_TP_AUTHKEY"


@dataclass
class LoRAEngineConfig:
    """Sizes of SGLang's LoRA memory pool, fixed at start-up."""

    max_rank: int = 16
    max_adapters: int = 8  # adapters resident at once (= SGLang max_loras_per_batch)
    # The engine layers SGLang wraps (the family's: ``WeightMap.lora_base_modules``).
    target_modules: Tuple[str, ...] = LORA_BASE_MODULES

    def server_args_kwargs(self, device: str) -> Dict[str, Any]:
        return dict(
            enable_lora=True,
            max_lora_rank=self.max_rank,
            # +1: base rows take a pool slot too; with room for every adapter nothing is ever
            # evicted, so adapter tensors handed out as views stay the engine's own memory.
            max_loras_per_batch=self.max_adapters + 1,
            max_loaded_loras=self.max_adapters + 1,
            lora_target_modules=list(self.target_modules),  # SGLang wraps layers, q/k/v as qkv_proj
            lora_backend="torch_native" if device == "cpu" else "triton",
        )


@dataclass
class EngineConfig:
    """What the runtime needs to start a ModelRunner for one checkpoint directory.

    ``max_num_tokens`` is the token budget: the KV pool holds this many tokens and one
    ``ModelRunner.forward`` never carries more; larger calls are split.
    """

    model_path: str
    architecture: str
    # The checkpoint as the face resolved it (a local directory or a Hub snapshot): every rank reads
    # these files, skipping ``skip_tensors`` (tensors the model does not use).
    weight_files: Tuple[str, ...] = ()
    weight_format: str = "safetensors"
    skip_tensors: Tuple[str, ...] = ()
    # Safetensors files every rank reads after the checkpoint: a new task head the face initialised
    # (transformers' initialisation, before the engine starts; see modeling/load_plan.py).
    extra_weight_files: Tuple[str, ...] = ()
    # The model's config as SGLang must read it (model_type set, architectures = the engine class):
    # each rank writes it to a private directory for SGLang, so old configs and owners' class names
    # in the checkpoint's own config.json never reach SGLang.
    hf_config: Dict[str, Any] = field(default_factory=dict)
    # ``module.qualname`` of the SGLang-side model class (imported by every rank when it starts).
    model_class: str = ENCODER_CLASS
    device: str = "cpu"
    dtype: str = "float32"
    tp_size: int = 1
    nnodes: int = 1  # multi-node TP: SGLang's nnodes / node_rank / dist_init_addr
    node_rank: int = 0
    dist_init_addr: Optional[str] = None
    max_num_tokens: int = DEFAULT_MAX_NUM_TOKENS
    max_running_requests: int = DEFAULT_MAX_RUNNING_REQUESTS
    max_sequence_length: int = 512
    # Who computes self-attention: "sdpa" -- the model calls torch's scaled_dot_product_attention on
    # each sequence's own q/k/v (what an encoder needs: one pass, nothing kept); "backend" -- SGLang's
    # attention backend (:meth:`resolved_attention_backend`), which writes K/V to the KV pool and
    # reads them back.
    encoder_attention: str = "sdpa"
    random_seed: int = 0
    # The GEMM behind every linear (engine/gemm.py): "auto" until the runtime chooses, then the path.
    gemm: str = "auto"
    # LoRA slots; None = no LoRA machinery (see LoRAEngineConfig).
    lora: Optional["LoRAEngineConfig"] = None
    # Tensor parallel: how long rank 0 waits for a worker -- its reply to a call, a collective once
    # the engine runs, a start-up handshake -- before the call raises WorkerError naming the rank.
    worker_timeout_s: float = 30.0
    # Tensor parallel start-up as a whole: workers connecting, the rendezvous, every rank's engine.
    start_timeout_s: float = 600.0
    # Passed through to ServerArgs unchanged (SGLang field names).
    engine_options: Dict[str, Any] = field(default_factory=dict)

    @property
    def ranks_per_node(self) -> int:
        return max(1, self.tp_size // self.nnodes)

    def resolved_attention_backend(self) -> str:
        """The user's ``attention_backend=`` (an SGLang ServerArgs field, kept in ``engine_options``),
        else the device's default."""
        if self.engine_options.get("attention_backend"):
            return self.engine_options["attention_backend"]
        return "torch_native" if self.device == "cpu" else "triton"

    def server_args_kwargs(self, dist_port: int, model_path: Optional[str] = None) -> Dict[str, Any]:
        kwargs: Dict[str, Any] = dict(
            model_path=model_path or self.model_path,
            device=self.device,
            dtype=self.dtype,
            tp_size=self.tp_size,
            nnodes=self.nnodes,
            node_rank=self.node_rank,
            dist_init_addr=self.dist_init_addr,
            attention_backend=self.resolved_attention_backend(),
            disable_cuda_graph=True,
            disable_radix_cache=True,  # prefix reuse is wrong for a bidirectional encoder
            chunked_prefill_size=-1,  # so is chunked prefill
            is_embedding=True,
            skip_tokenizer_init=True,
            load_format="dummy",  # weights are loaded by the bridge (safetensors / weights_only)
            max_total_tokens=self.max_num_tokens,
            max_running_requests=self.max_running_requests,
            context_length=self.max_sequence_length,
            json_model_override_args='{"architectures": ["%s"]}' % self.architecture,
            random_seed=self.random_seed,
            nccl_port=dist_port,
            log_level="error",
        )
        if self.lora is not None:
            kwargs.update(self.lora.server_args_kwargs(self.device))
        if self.device == "cpu":
            kwargs.update(compat.cpu_server_args())
            if self.encoder_attention == "sdpa":  # (CUDA: its fp8 KV rules are untested here)
                kwargs["kv_cache_dtype"] = UNREAD_KV_CACHE_DTYPE
        kwargs.update(self.engine_options)
        return kwargs


def write_engine_config_dir(config: EngineConfig) -> Optional[str]:
    """A fresh private directory holding ``config.hf_config`` as config.json (what SGLang reads at
    start-up), or None when the config carries none (SGLang then reads ``model_path``). The caller
    removes it once the ModelRunner is built."""
    if not config.hf_config:
        return None
    directory = tempfile.mkdtemp(prefix="sglang-hf-bridge-config-")
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config.hf_config, f)
    return directory
