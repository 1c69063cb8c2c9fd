"""Turning ragged token sequences into one SGLang EXTEND batch, and giving its memory back.

Every request starts with an empty prefix: the tree cache handed to SGLang only allocates slots
and never matches prefixes (prefix reuse is wrong for a bidirectional encoder). SGLang's private
request and batch fields are touched only through :mod:`sglang_hf_bridge.compat`.
"""

from __future__ import annotations

import itertools
from typing import List, Optional, Sequence

from .. import compat

_request_counter = itertools.count()


class ExtendBatch:
    """One EXTEND batch on a ModelRunner: ``prepare()`` allocates and returns the ForwardBatch,
    ``release()`` (in a ``finally``; idempotent) returns its rows and KV slots."""

    def __init__(self, model_runner, sequences: List[Sequence[int]], lora_ids: List[Optional[str]]):
        self.model_runner = model_runner
        self.reqs = [compat.encoder_request(f"bridge-{next(_request_counter)}", ids, lora)
                     for ids, lora in zip(sequences, lora_ids)]
        self.schedule_batch = None

    def prepare(self):
        from sglang.srt.managers.schedule_batch import ScheduleBatch
        from sglang.srt.model_executor.forward_batch_info import ForwardBatch
        from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

        mr = self.model_runner
        allocator = compat.kv_slot_allocator(mr)
        cache = compat.NoPrefixCache(page_size=1, device=mr.device, token_to_kv_pool_allocator=allocator)
        batch = ScheduleBatch.init_new(
            reqs=self.reqs,
            req_to_token_pool=compat.request_to_token_pool(mr),
            token_to_kv_pool_allocator=allocator,
            tree_cache=cache,
            model_config=mr.model_config,
            enable_overlap=False,
            spec_algorithm=SpeculativeAlgorithm.NONE,
        )
        self.schedule_batch = batch
        try:  # a failure half-way gives back what was allocated here
            batch.prepare_for_extend()
            for r in self.reqs:
                if compat.request_prefix_len(r) != 0:  # a guard on the invariant this module exists for
                    raise RuntimeError("internal error: an encoder request was given a cached prefix")
            compat.move_prefill_ids_to_device(batch)
            return ForwardBatch.init_new(batch, mr, return_hidden_states_before_norm=False)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Return the batch's KV slots and request rows; idempotent, so an interrupted release
        can simply be called again."""
        batch = self.schedule_batch
        if batch is None:
            return
        mr = self.model_runner
        compat.release_batch_kv_slots(batch, compat.kv_slot_allocator(mr))
        for r in self.reqs:
            if compat.request_holds_kv(r):
                compat.request_to_token_pool(mr).free(r)
        self.schedule_batch = None
