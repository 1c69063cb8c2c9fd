"""RankEngine: one SGLang ModelRunner on one tensor-parallel rank (start, forward, close).

Every rank runs one: rank 0 in the user's process, ranks 1..N-1 in worker processes
(:mod:`.workers`). It knows nothing of transformers' ``PreTrainedModel``, of caching policy or
of other ranks: callers hand it an :class:`~.types.EncoderCall` whose caching the front
(:class:`~.runtime.EncoderRuntime`) has already decided.
"""

from __future__ import annotations

import shutil
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from .. import compat
from ..errors import EngineClosedError
from ..process import deferred_interrupts, free_local_port, resolve_qualified_name
from ..sglang_models.forward_context import (
    PassInputs,
    PassOutputs,
    QueryOnlyLoRA,
    QueryOnlyTokens,
    forward_context,
)
from . import gemm
from .adapters import AdapterPool
from .config import EngineConfig, write_engine_config_dir
from .frozen_cache import FrozenStateStore
from .head_output import head_into_destinations
from .packed_weights import PackedWeights
from .scheduler import plan_chunks
from .types import EncoderCall, EncoderResult, EncoderSequence, Logits, SequenceResult
from .versions import writes_base_weights

WeightIterator = Iterable[Tuple[str, torch.Tensor]]


class RankEngine:
    """Lifecycle: ``start(weights)`` -> ``forward(call)``* -> ``close()``."""

    def __init__(self, config: EngineConfig, rank: int = 0, dist_port: Optional[int] = None):
        self.config = config
        self.rank = rank
        self.dist_port = dist_port
        self.model_runner = None
        self.model = None
        self._closed = False
        self._holds_parallel_runtime = False
        self.adapters = AdapterPool(self)
        self.frozen_store = FrozenStateStore()  # this rank's frozen-layer states
        self.packed_weights: Optional[PackedWeights] = None  # the "onednn-packed" GEMM path's copies

    # ------------------------------------------------------------------ lifecycle
    @property
    def started(self) -> bool:
        return self.model_runner is not None and not self._closed

    @property
    def runner(self):
        if self._closed or self.model_runner is None:
            raise EngineClosedError("the SGLang engine of this model is closed")
        return self.model_runner

    def start(self, weights: WeightIterator) -> "RankEngine":
        from sglang.srt.models.registry import ModelRegistry

        cfg = self.config
        compat.prepare_process(cfg.device)
        compat.check_parallel_runtime_available(cfg.device, cfg.tp_size)  # before publish() touches globals
        ModelRegistry.models[cfg.architecture] = resolve_qualified_name(cfg.model_class)
        port = self.dist_port or free_local_port()
        config_dir = write_engine_config_dir(cfg)
        try:
            self._start_runner(cfg, port, config_dir)
        finally:
            if config_dir is not None:
                shutil.rmtree(config_dir, ignore_errors=True)
        self.load_weights(weights)
        self.initial_pool_stats = self.pool_stats()
        return self

    def _start_runner(self, cfg: EngineConfig, port: int, config_dir: Optional[str]) -> None:
        from sglang.srt.configs.model_config import ModelConfig
        from sglang.srt.distributed import bootstrap
        from sglang.srt.model_executor.model_runner import ModelRunner
        from sglang.srt.runtime_context import SpawnRanks, get_schedule, publish
        from sglang.srt.server_args import ServerArgs

        server_args = ServerArgs(**cfg.server_args_kwargs(port, model_path=config_dir))
        local_rank = self.rank % cfg.ranks_per_node  # device / core slot on this node
        publish(server_args, role="scheduler", ranks=SpawnRanks(world_rank=self.rank, gpu_id=local_rank))
        compat.init_process_global_configs()
        model_config = ModelConfig.from_server_args(server_args)
        compat.init_parallel_runtime_once(bootstrap, server_args, cfg.device, port, cfg.tp_size)
        self._holds_parallel_runtime = True
        bootstrap.init_layer_runtime(model_config=model_config)
        if cfg.lora is not None:
            compat.patch_lora_pinning()
        with compat.no_pinning():
            # The fraction ServerArgs resolved (compat.cpu_server_args pins it on CPU; a user's
            # mem_fraction_static= overrides it), read as SGLang's own TpModelWorker reads it.
            mr = ModelRunner(model_config=model_config, mem_fraction_static=get_schedule().mem_fraction_static,
                             gpu_id=local_rank, nccl_port=port, server_args=server_args)
            mr.alloc_memory_pool()
            mr.init_attention_backends()
            mr.init_cuda_graphs()
        compat.skip_lora_on_base_batches(mr)
        if cfg.encoder_attention == "sdpa":
            compat.release_unread_kv_memory(mr)
        self.model_runner = mr
        self.model = mr.model
        if cfg.gemm not in ("auto", "aten"):  # "aten" is SGLang's own F.linear: nothing to route
            if cfg.gemm == gemm.PACKED:
                self.packed_weights = gemm.packed_weights_for(cfg.dtype, gemm.encoder_linear_shapes(cfg.hf_config))
            linear, linear_gelu = gemm.path_functions(cfg.gemm, self.packed_weights)
            compat.route_linear_layers(mr.model, linear)
            mr.model.use_linear(linear, linear_gelu)

    def after_operation(self, fn, args: tuple) -> None:
        """A rank operation ran here (or failed part-way): packed weight copies go if it may
        have written base weights."""
        if self.packed_weights is not None and writes_base_weights(fn, args):
            self.packed_weights.dropped()

    def load_weights(self, weights: WeightIterator) -> None:
        """Load HF-named tensors; every engine parameter must be filled."""
        loaded = self.model.load_weights(weights)
        missing = sorted(self.model.expected_loaded_names() - set(loaded))
        if missing:
            raise ValueError(f"checkpoint is missing tensors for: {', '.join(missing[:8])}"
                             + (" ..." if len(missing) > 8 else ""))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.model_runner = self.model = None
        self.frozen_store.tensors.clear()
        if self.packed_weights is not None:
            self.packed_weights.dropped()
        if self._holds_parallel_runtime:
            self._holds_parallel_runtime = False
            compat.release_parallel_runtime()

    def pool_stats(self) -> Dict[str, int]:
        mr = self.runner
        return {
            "free_request_rows": compat.request_to_token_pool(mr).available_size(),
            "free_kv_slots": compat.kv_slot_allocator(mr).available_size(),
        }

    # ------------------------------------------------------------------ forward
    def forward(self, call: EncoderCall) -> EncoderResult:
        """This rank's share of a call (the frozen-layer plan, if any, applied to its store)."""
        if call.frozen is not None:
            return self.frozen_store.apply(call, self.forward_engine)
        return self.forward_engine(call)

    @torch.no_grad()
    def forward_engine(self, call: EncoderCall) -> EncoderResult:
        mr = self.runner
        if self.packed_weights is not None:
            self.packed_weights.next_pass()
        results: List[SequenceResult] = [None] * len(call.sequences)  # type: ignore[list-item]
        budget = min(self.config.max_num_tokens, compat.kv_slot_allocator(mr).available_size())
        rows = min(self.config.max_running_requests, compat.request_to_token_pool(mr).available_size())
        for chunk in plan_chunks([len(s.input_ids) for s in call.sequences], budget, rows):
            for idx, res in zip(chunk, self._forward_chunk(mr, call, chunk)):
                results[idx] = res
        return EncoderResult(sequences=results)

    def _forward_chunk(self, mr, call: EncoderCall, chunk: List[int]) -> List[SequenceResult]:
        from .batch import ExtendBatch

        seqs = [call.sequences[i] for i in chunk]
        device = mr.device
        lens = [len(s.input_ids) for s in seqs]
        starts = [0]
        for n in lens[:-1]:
            starts.append(starts[-1] + n)
        initial = qo_initial = None
        if call.start_layer:
            initial = torch.cat([s.initial_hidden for s in seqs]).to(device)
            qo = [s.query_only_initial for s in seqs if s.query_only]
            qo_initial = torch.cat(qo).to(device) if qo else None
        inputs = PassInputs(
            position_ids=_flat([s.position_ids for s in seqs], device),
            token_type_ids=_flat([s.token_type_ids or [0] * n for s, n in zip(seqs, lens)], device),
            collect_hidden_states=call.output_hidden_states,
            query_only=_query_only_tokens(seqs, starts, device, self._query_only_lora),
            start_layer=call.start_layer,
            stop_layer=call.stop_layer,
            initial_hidden=initial,
            query_only_initial=qo_initial,
            attention_segments=lens if self.config.encoder_attention == "sdpa" else None,
        )
        # A Ctrl-C is held back while SGLang builds and runs the batch (its batch preparation is
        # not exception-safe: KV slots allocated before an interrupt there would be lost).
        batch = ExtendBatch(mr, [s.input_ids for s in seqs], [s.lora_id for s in seqs])
        with deferred_interrupts(), compat.no_pinning(), forward_context(inputs):
            try:
                out = compat.forward_outputs(mr.forward(batch.prepare()))
            finally:
                try:
                    batch.release()
                except BaseException:
                    batch.release()  # interrupted while giving memory back: finish, then raise
                    raise
        return self._split_results(call, seqs, starts, lens, out)

    def _head_input(self, call: EncoderCall, seqs, starts, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        """The hidden states of the chunk's rows that go through the head (None: no head)."""
        if call.logits is Logits.ALL:
            return hidden
        if call.logits is Logits.SELECTED:
            idx = [st + pos for s, st in zip(seqs, starts) for pos in (s.logit_positions or [])]
            return hidden[torch.as_tensor(idx, dtype=torch.long, device=hidden.device)]
        if call.logits is Logits.NONE:
            return None
        if call.logits is Logits.MEAN:  # as transformers: the sum over the sequence, divided by its length
            lens = [len(s.input_ids) for s in seqs]
            return torch.stack([hidden[st:st + n].sum(0) / n for st, n in zip(starts, lens)])
        raise TypeError(f"EncoderCall.logits is {call.logits!r}, not a Logits member")

    def _split_results(self, call, seqs, starts, lens, out: PassOutputs) -> List[SequenceResult]:
        hidden = out.hidden
        vocab_ids = None
        if call.vocab_ids is not None:
            vocab_ids = torch.as_tensor(call.vocab_ids, dtype=torch.long, device=hidden.device)
        # Gather every position that needs the head and run it once for the whole chunk (once per
        # head where rows' adapters bring their own) -- or, where the caller holds the output,
        # group by group straight into it (.head_output).
        logits = qo_logits = None
        into = call.logits is Logits.ALL and all(s.logits_into is not None for s in seqs)
        if into:
            width = self.model.config.vocab_size if vocab_ids is None else len(vocab_ids)
            head_into_destinations(self._apply_head, seqs, starts, lens, hidden, out.query_only_last, vocab_ids,
                                   width)
        head_input = None if into else self._head_input(call, seqs, starts, hidden)
        counts = [_head_rows(call.logits, s, n) for s, n in zip(seqs, lens)]
        if out.query_only_last is not None and head_input is not None:
            # One head product over the rows and the query-only rows (not one each: the tied
            # decoder is the largest weight of the model).
            n = head_input.shape[0]
            both = self._apply_head(torch.cat([head_input, out.query_only_last]), vocab_ids, seqs + seqs,
                                    counts + [len(s.query_only or []) for s in seqs])
            logits, qo_logits = (both[:n] if n else None), both[n:]
        elif head_input is not None and head_input.shape[0] > 0:
            logits = self._apply_head(head_input, vocab_ids, seqs, counts)

        results, offset, qo_offset = [], 0, 0
        for s, st, n in zip(seqs, starts, lens):
            r = SequenceResult()
            if logits is not None:
                k = _head_rows(call.logits, s, n)
                r.logits = logits[offset : offset + k]
                offset += k
            if call.output_hidden_states:
                r.hidden_states = [h[st : st + n] for h in out.hidden_states]
            if call.return_last_hidden:
                r.last_hidden = hidden[st : st + n]
            nq = len(s.query_only or [])
            if nq:
                if call.return_last_hidden:
                    r.query_only_last_hidden = out.query_only_last[qo_offset : qo_offset + nq]
                if qo_logits is not None:
                    r.query_only_logits = qo_logits[qo_offset : qo_offset + nq]
                if call.output_hidden_states:
                    r.query_only_hidden_states = [h[qo_offset : qo_offset + nq] for h in out.query_only_hidden_states]
                qo_offset += nq
            results.append(r)
        return results

    def _apply_head(self, rows: torch.Tensor, vocab_ids, seqs, counts: List[int]) -> torch.Tensor:
        """The head on ``rows`` (``counts[i]`` of them from sequence i): the model's, or for rows
        whose adapter has its own head (PEFT's modules_to_save), that one."""
        heads = self.adapters.heads_of([s.lora_id for s in seqs]) if self.adapters.adapters else None
        if heads is None:
            return self.model.compute_logits(rows, vocab_ids)
        owner = [id(h) if h else 0 for h, n in zip(heads, counts) for _ in range(n)]
        by_head = {id(h) if h else 0: h for h in heads}
        out = None
        for key, head in by_head.items():
            idx = torch.tensor([i for i, k in enumerate(owner) if k == key], dtype=torch.long, device=rows.device)
            if idx.numel() == 0:
                continue
            part = self.model.compute_logits(rows[idx], vocab_ids, head=head or None)
            if out is None:
                out = part.new_empty((rows.shape[0], part.shape[-1]))
            out[idx] = part
        return out

    def _query_only_lora(self, lora_ids, device) -> Optional[QueryOnlyLoRA]:
        if not any(lora_ids):
            return None
        by_id: Dict[str, List[int]] = {}
        for row, lora_id in enumerate(lora_ids):
            if lora_id is not None:
                by_id.setdefault(lora_id, []).append(row)
        groups = []
        for lora_id, rows in by_id.items():
            a = self.adapters.adapters[lora_id]
            groups.append((self.adapters.slot_of(lora_id), a.rank, a.scaling,
                           torch.tensor(rows, dtype=torch.long, device=device)))
        return QueryOnlyLoRA(groups=groups)


def _head_rows(logits: Logits, seq, length: int) -> int:
    """How many head rows a sequence of ``length`` tokens gets."""
    if logits is Logits.ALL:
        return length
    if logits is Logits.MEAN:
        return 1
    return len(seq.logit_positions or [])


def _flat(lists: List[List[int]], device) -> torch.Tensor:
    flat = [x for lst in lists for x in lst]
    return torch.tensor(flat, dtype=torch.long, device=device)


def _query_only_tokens(seqs, starts, device, lora_groups) -> Optional[QueryOnlyTokens]:
    specs = [(i, q) for i, s in enumerate(seqs) for q in (s.query_only or [])]
    if not specs:
        return None
    segments = [(len(s.query_only), st, len(s.input_ids)) for s, st in zip(seqs, starts) if s.query_only]
    return QueryOnlyTokens(
        input_ids=torch.tensor([q.input_id for _, q in specs], dtype=torch.long, device=device),
        position_ids=torch.tensor([q.position_id for _, q in specs], dtype=torch.long, device=device),
        token_type_ids=torch.tensor([q.token_type_id for _, q in specs], dtype=torch.long, device=device),
        key_segments=segments,
        lora=lora_groups([seqs[i].lora_id for i, _ in specs], device),
    )


def warm_up_then_bound_collectives(engine: RankEngine) -> None:
    """Last start-up step on every rank: one tiny forward in lockstep (on CPU the first one
    compiles SGLang's vocabulary-parallel helper, slowly and at a different pace on each rank;
    timings in docs/tensor-parallel.md), still under the start-up limit; then every collective is
    bounded by ``worker_timeout_s``."""
    engine.forward(EncoderCall(sequences=[EncoderSequence(input_ids=[0, 0], position_ids=[0, 1])], logits=Logits.ALL))
    compat.bound_collective_timeouts(engine.config.worker_timeout_s)
