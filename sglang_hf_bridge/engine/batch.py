"""Turning ragged token sequences into one SGLang EXTEND batch, and giving its memory back.

Every request starts with an empty prefix: the tree cache handed to SGLang only allocates slots
and never matches prefixes (prefix reuse is wrong for a bidirectional encoder).
"""

from __future__ import annotations

import itertools
from array import array
from types import SimpleNamespace
from typing import List, Optional, Sequence

import torch

from sglang.srt.managers.schedule_batch import Req, ScheduleBatch
from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

_request_counter = itertools.count()


class NoPrefixCache(SimpleNamespace):
    """The minimal tree-cache surface ``ScheduleBatch`` needs; it allocates, never shares."""

    def supports_swa(self) -> bool:
        return False

    def supports_mamba(self) -> bool:
        return False

    def supports_prefix_sharing(self) -> bool:
        return False

    def evict(self, params) -> None:
        pass

    def maybe_hand_to_session(self, req) -> None:
        pass


def make_request(input_ids: Sequence[int], lora_id: Optional[str] = None) -> Req:
    req = Req(
        rid=f"bridge-{next(_request_counter)}",
        origin_input_text="",
        origin_input_ids=array("q", input_ids),
        sampling_params=SamplingParams(max_new_tokens=0),
        lora_id=lora_id,
    )
    req.full_untruncated_fill_ids = req.origin_input_ids
    req.logprob_start_len = -1
    req.extend_end = len(req.origin_input_ids)
    return req


class ExtendBatch:
    """One EXTEND batch on a ModelRunner; use as a context manager so its rows and KV slots are
    returned to the pools whatever happens during the forward."""

    def __init__(self, model_runner, sequences: List[Sequence[int]], lora_ids: List[Optional[str]]):
        self.model_runner = model_runner
        self.reqs = [make_request(ids, lora) for ids, lora in zip(sequences, lora_ids)]
        self.schedule_batch: Optional[ScheduleBatch] = None

    def __enter__(self) -> ForwardBatch:
        mr = self.model_runner
        cache = NoPrefixCache(
            page_size=1, device=mr.device, token_to_kv_pool_allocator=mr.token_to_kv_pool_allocator
        )
        batch = ScheduleBatch.init_new(
            reqs=self.reqs,
            req_to_token_pool=mr.req_to_token_pool,
            token_to_kv_pool_allocator=mr.token_to_kv_pool_allocator,
            tree_cache=cache,
            model_config=mr.model_config,
            enable_overlap=False,
            spec_algorithm=SpeculativeAlgorithm.NONE,
        )
        self.schedule_batch = batch
        batch.prepare_for_extend()
        for r in self.reqs:
            if r.prefix_len != 0:  # a guard on the invariant this module exists for
                raise RuntimeError("internal error: an encoder request was given a cached prefix")
        if batch.input_ids is None and getattr(batch, "prefill_input_ids_cpu", None) is not None:
            batch.input_ids = batch.prefill_input_ids_cpu.to(batch.device)
            batch.prefill_input_ids_cpu = None
        return ForwardBatch.init_new(batch, mr, return_hidden_states_before_norm=False)

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        batch, self.schedule_batch = self.schedule_batch, None
        if batch is None:
            return
        mr = self.model_runner
        if batch.out_cache_loc is not None:
            mr.token_to_kv_pool_allocator.free(batch.out_cache_loc)
            batch.out_cache_loc = None
        for r in self.reqs:
            if r.kv.holds_kv:
                mr.req_to_token_pool.free(r)
