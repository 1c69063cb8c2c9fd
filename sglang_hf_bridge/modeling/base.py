"""Shared base of the HF-facing model classes: one :class:`EncoderRuntime` underneath.

The face is thin: it validates HF-style inputs, asks the runtime for results through the
engine's named interface (``EncoderCall`` / ``EncoderResult``) and shapes them like transformers.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import weakref
from typing import Any, Optional, Tuple, Union

import torch
from torch import nn
from transformers import PreTrainedModel

from .. import log_control
from ..checkpoint import (
    CheckpointFiles,
    iter_engine_tensors,
    locate_checkpoint,
    read_config,
    read_mask_token_id,
    validate_masked_lm_config,
    write_tensors_file,
)
from ..engine import GEMM_PATHS, EncoderRuntime, EngineConfig, LoRAEngineConfig
from ..errors import CheckpointError, EngineClosedError, InferenceOnlyError, UnsupportedLoadOptionError
from ..hub import hub_options, resolve_model_directory
from ..sglang_models.families import Family, family_for
from ..sglang_models.heads import HEAD_CONFIG_KEY, MASKED_LM, Head
from ..sglang_models.layout import tp_size_problems
from .adapters import SGLangAdapterMixin
from .caching import EngineCacheMixin
from .hf_surface import (
    LOADING_INFO_KEYS,
    HFSurfaceMixin,
    device_from_device_map,
    effective_config,
    engine_options,
    merge_option,
    transformers_options,
)
from .load_plan import LoadPlan, plan_checkpoint_load
from .saving import save_adapter_and_base, save_engine_checkpoint

_LIVE_MODELS: "weakref.WeakSet[SGLangPreTrainedModel]" = weakref.WeakSet()


@atexit.register
def _close_all_models() -> None:
    for model in list(_LIVE_MODELS):
        model.close()


class _InferenceOnlyGrad(torch.autograd.Function):
    """Identity whose backward explains why there is no gradient instead of failing obscurely."""

    @staticmethod
    def forward(ctx, tensor, guard):
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        raise InferenceOnlyError(
            "SGLang-backed models are inference-only: their forward runs on the SGLang engine, "
            "which builds no autograd graph, so a backprop Trainer cannot train them. Use "
            "sglang_hf_bridge.training.MeZOTrainer with MeZOTrainingArguments (forward-only "
            "fine-tuning: change the two class names in your Trainer script), or load the "
            "checkpoint into transformers' own class for backpropagation."
        )


def _resolve_dtype(dtype, config) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    return dtype


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():  # else SGLang fails deep inside its start
        raise UnsupportedLoadOptionError(f"device={str(device)!r}: CUDA is not available on this host "
                                         "(torch.cuda.is_available() is False): pass device='cpu'")
    return device


def _default_mask_token_id(config, directory: Optional[str]) -> Tuple[Optional[int], str]:
    """``config.mask_token_id`` > the checkpoint's tokenizer files > none (then a call that looks
    for masks asks for ``mask_token_id=``)."""
    configured = getattr(config, "mask_token_id", None)
    if configured is not None:
        return configured, "config.mask_token_id"
    found = read_mask_token_id(directory, config.vocab_size) if directory else None
    if found is not None:
        return found
    return None, "neither config.mask_token_id nor the checkpoint's tokenizer files declare one"


def _start_runtime(engine_config: EngineConfig, files: CheckpointFiles,
                   new_tensors: Optional[dict] = None) -> EncoderRuntime:
    """Start the engine (importing SGLang on first use) and load the checkpoint into it, then the
    ``new_tensors`` (a newly initialised task head), which every rank reads from a private file
    removed once the engine runs."""
    log_control.import_sglang_quietly()
    scratch = tempfile.mkdtemp(prefix="sglang-hf-bridge-new-head-") if new_tensors else None
    try:
        if scratch is not None:
            engine_config.extra_weight_files = (write_tensors_file(new_tensors, scratch),)
        with log_control.quiet_sglang():
            runtime = EncoderRuntime(engine_config)
            try:
                runtime.start(iter_engine_tensors(files, engine_config.skip_tensors, engine_config.extra_weight_files,
                                                  progress=log_control.progress_enabled()))
            except BaseException:
                runtime.close()
                raise
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
            engine_config.extra_weight_files = ()
    return runtime


def check_tensor_parallel_size(config, tp_size: int, device: str = "cpu") -> None:
    """Refuse a ``tp_size`` the sharded layers cannot split, before any process starts (the
    padding rules are the layouts', ``sglang_models/layout.py``)."""
    problems = tp_size_problems(config, tp_size, device)
    if problems:
        raise ValueError(f"tp_size={tp_size} does not divide {', '.join(problems)}")


class SGLangPreTrainedModel(HFSurfaceMixin, SGLangAdapterMixin, EngineCacheMixin, PreTrainedModel):
    """PreTrainedModel whose weights live in an SGLang ModelRunner, not in torch parameters."""

    # The checkpoint family this class loads (sglang_models/families.py): every fact about it --
    # model types, names, position ids, tying, the SGLang-side class -- comes from there. A config
    # without model_type is read as ``config_class``'s.
    family: Optional[Family] = None
    # The head on the encoder (sglang_models/heads.py): what the engine builds on top, which rows
    # it reads, and whether a checkpoint without it gets a new one.
    head_spec: Head = MASKED_LM
    # transformers' class whose names and shapes a checkpoint must match (the loading oracle).
    hf_model_class: str = ""
    # Derived from ``family`` for each subclass (read by transformers and by the face's methods).
    base_model_prefix = "roberta"
    absolute_position_ids: bool = False
    model_types: Tuple[str, ...] = ()
    sglang_architecture: str = ""
    sglang_model_class: str = ""
    supports_gradient_checkpointing = False
    _supports_sdpa = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        family = cls.__dict__.get("family")
        if family is not None:
            cls.base_model_prefix = family.weight_map.hf_prefix
            cls.absolute_position_ids = family.absolute_position_ids
            cls.model_types = family.model_types
            cls.sglang_architecture = family.sglang_architecture
            cls.sglang_model_class = family.sglang_model_class
        # transformers' class of this family and head (the loading oracle, ``architectures`` on save).
        model_type = getattr(cls.__dict__.get("config_class"), "model_type", None) or \
            getattr(getattr(cls, "config_class", None), "model_type", None)
        if cls.family is not None and "hf_model_class" not in cls.__dict__ and model_type in cls.family.hf_classes:
            cls.hf_model_class = cls.family.hf_classes[model_type].replace("ForMaskedLM", cls.head_spec.hf_suffix)

    def __init__(self, config, runtime: Optional[EncoderRuntime] = None):
        super().__init__(config)
        self._runtime = runtime
        self._engine_device = torch.device("cpu")
        self._engine_dtype = torch.float32
        # A zero-size parameter lets .backward() reach _InferenceOnlyGrad with a clear message.
        self._inference_only_guard = nn.Parameter(torch.zeros(0))
        self._mask_token = _default_mask_token_id(config, None)  # (id, where it comes from)
        _LIVE_MODELS.add(self)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Union[str, "os.PathLike"],
        *model_args,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[Union[str, torch.dtype]] = None,
        tp_size: int = 1,
        max_num_tokens: Optional[int] = None,
        enable_lora: bool = True,
        max_lora_rank: int = 16,
        max_loras: int = 8,
        result_cache_mb: float = 0.0,
        worker_timeout_s: float = 30.0,
        worker_start_timeout_s: float = 600.0,
        encoder_attention: Optional[str] = None,
        gemm: Optional[str] = None,
        **kwargs: Any,
    ):
        """Load an HF masked-LM checkpoint -- a local directory or a Hub id, resolved as transformers
        resolves it -- onto a new SGLang engine.

        ``max_num_tokens`` is the engine's token budget (KV pool size and the largest batch one
        engine pass carries); larger calls are split. ``enable_lora`` starts SGLang's LoRA
        machinery with room for ``max_loras`` resident adapters of rank <= ``max_lora_rank``.
        ``result_cache_mb`` > 0 turns the whole-sequence result cache on (see
        ``enable_result_cache``). ``worker_timeout_s`` bounds every wait on a TP worker once the
        engine runs, ``worker_start_timeout_s`` the TP start-up as a whole. ``encoder_attention``:
        ``"sdpa"`` (default on CPU) -- the model runs torch's SDPA on each sequence's own q/k/v;
        ``"backend"`` (default on CUDA and when ``attention_backend=`` is given) -- SGLang's
        attention backend, through the KV pool. Same answers (tested); ``"sdpa"`` skips the KV
        round trip. ``gemm``: the matrix product behind every linear -- ``"auto"`` (default, or
        ``SGLANG_HF_BRIDGE_GEMM``) measures torch's paths once per host and takes the fastest,
        ``"aten"`` (``F.linear``), ``"onednn"`` or ``"onednn-packed"`` (oneDNN on weights packed
        once, kept in step with every write; one more copy of the linears' weights) force one
        (``engine/gemm.py``). The first call in a process imports SGLang (a few seconds).

        Other keywords, as transformers takes them (table: ``TRANSFORMERS_LOAD_KEYWORDS``):
        honoured -- ``torch_dtype`` (= ``dtype``), ``device_map`` naming one device, ``config=``
        (its sizes must match the checkpoint's), the Hub look-up (``cache_dir``, ``revision``,
        ``subfolder``, ``token``, ``local_files_only``, ``force_download``, ``proxies``),
        ``use_safetensors``, ``output_loading_info`` (returns ``(model, info)`` with transformers'
        missing/unexpected/mismatched keys), ``ignore_mismatched_sizes`` (for a task head only:
        a head fine-tuned for another ``num_labels`` is re-initialised, as in transformers), and config
        attributes (``output_hidden_states=True`` ...); ignored (logged at DEBUG) -- torch placement
        options; refused with
        :class:`UnsupportedLoadOptionError` -- ``from_tf``,
        ``from_flax``, ``trust_remote_code=True`` (no checkpoint code ever runs),
        ``quantization_config``, ``state_dict``, a multi-device ``device_map``... Anything else
        must be an SGLang ``ServerArgs`` field (passed through unchanged), else ``TypeError``.
        """
        if model_args:
            raise TypeError(f"from_pretrained() takes no extra positional arguments, got {len(model_args)}")
        if not isinstance(result_cache_mb, (int, float)) or result_cache_mb < 0:
            raise ValueError(f"result_cache_mb must be a number >= 0, got {result_cache_mb!r}")
        options = transformers_options(kwargs)
        device = merge_option("device", device, device_from_device_map(options.get("device_map")), "device_map")
        dtype = merge_option("dtype", dtype, options.get("torch_dtype"), "torch_dtype")
        directory = resolve_model_directory(pretrained_model_name_or_path, subfolder=options.get("subfolder"),
                                            use_safetensors=options.get("use_safetensors"), **hub_options(options))
        files = locate_checkpoint(directory, use_safetensors=options.get("use_safetensors"))
        config = effective_config(cls._read_config(files), options.get("config"), kwargs)
        cls._check_family(config, files.directory)
        plan = plan_checkpoint_load(cls.hf_model_class, files, config, source=os.fspath(pretrained_model_name_or_path),
                                    head=cls.head_spec,
                                    ignore_mismatched_sizes=bool(options.get("ignore_mismatched_sizes")))
        sglang_options = engine_options(kwargs)
        torch_dtype, torch_device = _resolve_dtype(dtype, config), _resolve_device(device)
        if torch_device.type == "cuda" and (torch_device.index or 0) != 0:
            raise ValueError(f"device={torch_device}: the engine runs on the first visible GPU; choose it with "
                             "CUDA_VISIBLE_DEVICES and pass device='cuda'")
        engine_config = cls._engine_config(
            files, plan, config, torch_device, torch_dtype, tp_size, max_num_tokens,
            LoRAEngineConfig(max_rank=int(max_lora_rank), max_adapters=int(max_loras),
                             target_modules=(cls.family or family_for(config)).weight_map.lora_base_modules)
            if enable_lora else None,
            sglang_options, worker_timeout_s=worker_timeout_s, encoder_attention=encoder_attention,
            worker_start_timeout_s=worker_start_timeout_s, gemm=gemm,
        )
        runtime = _start_runtime(engine_config, files, plan.new_tensors)
        model = cls(config, runtime=runtime)
        model._engine_device = torch_device
        model._engine_dtype = torch_dtype
        model.config.dtype = torch_dtype  # as transformers: the config names the loaded dtype
        model._mask_token = _default_mask_token_id(config, files.directory)
        model.name_or_path = files.directory
        model.config.name_or_path = files.directory
        model.eval()
        if result_cache_mb:
            model.enable_result_cache(result_cache_mb)
        if options.get("output_loading_info"):
            return model, {key: plan.loading_info[key] for key in LOADING_INFO_KEYS}
        return model

    @classmethod
    def _read_config(cls, files: CheckpointFiles):
        """The checkpoint's config (never running code from it); one without ``model_type`` is read
        as this class's family."""
        config = read_config(files.directory, cls.config_class if cls.model_types else None)
        validate_masked_lm_config(config)
        return config

    @classmethod
    def _check_family(cls, config, directory: str) -> None:
        """A RoBERTa class must not load a BERT checkpoint (or the reverse): the position ids
        and names differ, and the answers would be silently wrong."""
        if cls.model_types and config.model_type not in cls.model_types:
            raise CheckpointError(
                f"{directory!r} is a {config.model_type!r} checkpoint; {cls.__name__} loads {list(cls.model_types)}. "
                "Use SGLangAutoModelForMaskedLM.from_pretrained(path), which picks the class by model_type")

    @classmethod
    def max_sequence_length(cls, config) -> int:
        """Tokens one sequence may have (the family's position-id rule)."""
        return (cls.family or family_for(config)).max_sequence_length(config)

    @classmethod
    def _engine_config(cls, files: CheckpointFiles, plan: LoadPlan, config, device: torch.device,
                       dtype: torch.dtype, tp_size,
                       max_num_tokens, lora: Optional[LoRAEngineConfig], engine_options: dict,
                       worker_timeout_s: float = 30.0, encoder_attention: Optional[str] = None,
                       worker_start_timeout_s: float = 600.0, gemm: Optional[str] = None) -> EngineConfig:
        """Validate the engine-shaping arguments (before any process starts) into an EngineConfig."""
        for name, value in (("worker_timeout_s", worker_timeout_s), ("worker_start_timeout_s", worker_start_timeout_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        if not isinstance(tp_size, int) or tp_size < 1:
            raise ValueError(f"tp_size must be a positive integer, got {tp_size!r}")
        check_tensor_parallel_size(config, tp_size, device.type)
        nnodes = int(engine_options.pop("nnodes", 1))
        node_rank = int(engine_options.pop("node_rank", 0))
        if node_rank != 0:
            raise ValueError("the process that calls from_pretrained is rank 0 (node_rank=0); start the other "
                             "nodes' ranks with `python -m sglang_hf_bridge.engine.tp_worker HOST:PORT RANK`")
        if nnodes < 1 or tp_size % nnodes:
            raise ValueError(f"nnodes={nnodes} must divide tp_size={tp_size}")
        # Naming an SGLang attention backend means "use it"; otherwise the model's own SDPA. A model
        # with windowed layers (ModernBERT) always runs its own: no SGLang 0.5.23 backend has a
        # bidirectional window.
        window = (cls.family or family_for(config)).sliding_window(config)
        if encoder_attention is None:  # CUDA: triton's one varlen kernel beats a launch per sequence
            encoder_attention = "backend" if (engine_options.get("attention_backend") or device.type != "cpu") \
                and window is None else "sdpa"
        if encoder_attention not in ("sdpa", "backend"):
            raise ValueError(f"encoder_attention must be 'sdpa' or 'backend', got {encoder_attention!r}")
        if encoder_attention == "backend" and window is not None:
            raise ValueError(
                f"encoder_attention='backend': SGLang's attention backends cannot express this model's bidirectional "
                f"sliding window ({config.model_type}: local_attention={config.local_attention}, {window} tokens each "
                "side on its windowed layers); use encoder_attention='sdpa' (the default for it)")
        if gemm is not None and gemm not in ("auto", *GEMM_PATHS):
            raise ValueError(f"gemm must be 'auto', {', '.join(repr(p) for p in GEMM_PATHS)}, got {gemm!r}")
        max_sequence_length = cls.max_sequence_length(config)
        if max_num_tokens is not None and max_num_tokens < max_sequence_length:
            raise ValueError(f"max_num_tokens={max_num_tokens} is smaller than one full-length sequence "
                             f"({max_sequence_length} tokens)")
        engine_config = EngineConfig(
            model_path=files.directory,
            weight_files=tuple(files.weight_files),
            weight_format=files.format,
            skip_tensors=tuple(sorted(plan.skip)),
            hf_config={**json.loads(config.to_json_string(use_diff=False)),
                       "architectures": [cls.sglang_architecture], HEAD_CONFIG_KEY: cls.head_spec.name},
            architecture=cls.sglang_architecture,
            model_class=cls.sglang_model_class,
            device=device.type,
            dtype=str(dtype).replace("torch.", ""),
            tp_size=tp_size,
            nnodes=nnodes,
            node_rank=node_rank,
            dist_init_addr=engine_options.pop("dist_init_addr", None),
            max_sequence_length=max_sequence_length,
            engine_options=engine_options,
            lora=lora,
            worker_timeout_s=float(worker_timeout_s),
            start_timeout_s=float(worker_start_timeout_s),
            encoder_attention=encoder_attention,
            gemm=gemm or "auto",
        )
        if max_num_tokens is not None:
            engine_config.max_num_tokens = int(max_num_tokens)
        engine_config.max_num_tokens = max(engine_config.max_num_tokens, max_sequence_length)
        return engine_config

    @property
    def mask_token_id(self) -> Optional[int]:
        """The id ``compute_mlm_logits`` looks for when ``positions=None``: ``config.mask_token_id``,
        else the checkpoint's tokenizer files (read by ``from_pretrained``), else None (such a call
        then asks for ``mask_token_id=``). Assign to change it."""
        return self._mask_token[0]

    @mask_token_id.setter
    def mask_token_id(self, value: int) -> None:
        self._mask_token = (value, "model.mask_token_id")

    # ------------------------------------------------------------------ adapters per row, saving
    def _assign_adapters(self, prepared, adapter_names) -> None:
        for seq, lora_id in zip(prepared.sequences, self._row_lora_ids(len(prepared.sequences), adapter_names)):
            seq.lora_id = lora_id

    def save_pretrained(self, save_directory, adapter_name: Optional[str] = None,
                        save_base_model: Optional[bool] = None, **kwargs) -> None:
        """Without adapters: an HF checkpoint (safetensors) transformers' own class of this
        family and head loads. With adapters (as transformers does with PEFT adapters loaded): the adapter
        ``adapter_name`` (default: the active one) in PEFT format; ``save_base_model=True``
        also writes the base checkpoint.

        Atomic (``sglang_hf_bridge.atomic_dir``): whatever happens to this process (Ctrl-C,
        kill -9, power loss), ``save_directory`` holds the old save or the new one, whole. Other
        files in it (tokenizer, ``trainer_state.json``, ``checkpoint-*/``) are kept; the previous
        save's weight files and config are replaced."""
        loaded = list(self._adapter_state())
        if loaded and adapter_name is None and self._bridge_active is None:
            adapter_name = loaded[0]
        if loaded and save_base_model:
            save_adapter_and_base(self, save_directory, adapter_name)  # one atomic swap for both
        elif loaded:
            self.save_adapter(save_directory, adapter_name)
        else:
            save_engine_checkpoint(self, save_directory)

    # ------------------------------------------------------------------ lifecycle
    @property
    def runtime(self) -> EncoderRuntime:
        """The engine underneath (:mod:`sglang_hf_bridge.engine`'s interface)."""
        if self._runtime is None or not self._runtime.started:
            raise EngineClosedError(
                f"{type(self).__name__} has no running engine (closed, or not loaded with from_pretrained)")
        return self._runtime

    def close(self) -> None:
        """Stop the engine and free its memory. The model is unusable afterwards."""
        runtime, self._runtime = getattr(self, "_runtime", None), None
        if runtime is not None:
            runtime.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def engine_pool_stats(self):
        """Free request rows and KV slots of the engine (they are all free between calls)."""
        return self.runtime.pool_stats()

    def engine_pool_capacity(self):
        """What :meth:`engine_pool_stats` reads when no call is in flight."""
        return self.runtime.pool_capacity()

    # ------------------------------------------------------------------ torch / HF surface
    @property
    def device(self) -> torch.device:
        return self._engine_device

    @property
    def dtype(self) -> torch.dtype:
        return self._engine_dtype

    def _init_weights(self, module):
        pass

    def _guard(self, tensor: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return _InferenceOnlyGrad.apply(tensor, self._inference_only_guard)
        return tensor
