"""Many callers, one engine: concurrent calls merged into shared engine passes.

SGLang's forward path is not thread-safe for an in-process caller, and a pass over 8 rows costs
far less than 8 passes over one. Callers submit :class:`EncoderCall` s; whoever finds no pass in
flight becomes the *leader* and runs every queued call that can share a pass with the oldest one
(same signature: what is asked of the rows) as ONE merged call, then the next group, until its
own call is answered, and hands leadership on. Calls that arrive while a pass runs ride the next
one (group commit). Callers that just got their answer need a moment to send their next call; so
that they are not left for the pass after, the leader lingers a little (at most a quarter of the
last pass, and ``linger_s``) while fewer calls are queued than threads have recently called.

Each caller gets back exactly its rows, in order, with its own adapters. A merged pass that
fails is re-run call by call, so one caller's failure fails only that caller. An interrupt of
the leader (Ctrl-C in its thread) puts the other callers' calls back in the queue for the next
leader; the interrupted caller gets its ``KeyboardInterrupt``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import replace
from typing import Callable, Deque, Dict, List, Optional

from .types import EncoderCall, EncoderResult

Run = Callable[[EncoderCall], EncoderResult]


def call_signature(call: EncoderCall) -> tuple:
    """What must be equal for two calls to share a pass (everything but the sequences)."""
    return (*call.output_signature(), call.frozen is None)


class _Pending:
    __slots__ = ("call", "result", "error", "done")

    def __init__(self, call: EncoderCall):
        self.call = call
        self.result: Optional[EncoderResult] = None
        self.error: Optional[BaseException] = None
        self.done = False

    def outcome(self) -> EncoderResult:
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


class CallBatcher:
    """Runs ``run(merged_call)`` for groups of concurrent calls; ``max_rows`` caps a group."""

    def __init__(self, run: Run, max_rows: int = 256, linger_s: float = 0.005):
        self._run = run
        self.max_rows = max_rows
        self.linger_s = linger_s
        self._recent: Dict[int, float] = {}  # caller thread -> when it last submitted
        self._last_pass_s = 0.0
        self._cv = threading.Condition()
        self._queue: Deque[_Pending] = deque()
        self._leader = False
        self.passes = 0  # merged passes run (for tests and benchmarks)
        self.merged_calls = 0  # calls that shared a pass with another

    def submit(self, call: EncoderCall) -> EncoderResult:
        mine = _Pending(call)
        with self._cv:
            self._queue.append(mine)
            self._recent[threading.get_ident()] = time.monotonic()
            self._cv.notify_all()  # a lingering leader counts arrivals
            try:
                while not mine.done and self._leader:
                    self._cv.wait()
            except BaseException:
                if not mine.done and mine in self._queue:
                    self._queue.remove(mine)
                raise
            if mine.done:
                return mine.outcome()
            self._leader = True
        try:
            while not mine.done:
                with self._cv:
                    self._linger()
                    group = self._take_group()
                started = time.monotonic()
                self._execute(group)
                self._last_pass_s = time.monotonic() - started
                with self._cv:
                    self._cv.notify_all()
        except BaseException:
            with self._cv:
                if mine in self._queue:
                    self._queue.remove(mine)
            raise
        finally:
            with self._cv:
                self._leader = False
                self._cv.notify_all()
        return mine.outcome()

    def _linger(self) -> None:
        """Wait (bounded) for callers that were active lately but have not re-submitted yet."""
        now = time.monotonic()
        window = max(1.0, 4 * self._last_pass_s)
        self._recent = {t: at for t, at in self._recent.items() if now - at < window}
        deadline = now + min(self.linger_s, 0.25 * self._last_pass_s)
        while len(self._queue) < len(self._recent) and now < deadline:
            self._cv.wait(deadline - now)
            now = time.monotonic()

    def _take_group(self) -> List[_Pending]:
        first = self._queue.popleft()
        group, rows, signature = [first], len(first.call.sequences), call_signature(first.call)
        for p in list(self._queue):
            if call_signature(p.call) == signature and rows + len(p.call.sequences) <= self.max_rows:
                self._queue.remove(p)
                group.append(p)
                rows += len(p.call.sequences)
        return group

    def _execute(self, group: List[_Pending]) -> None:
        try:
            if len(group) == 1:
                self._run_one(group[0])
            else:
                self._run_merged(group)
        except BaseException:
            # An interrupt of the leader: the others' calls go back to the front of the queue.
            with self._cv:
                for p in reversed(group):
                    if not p.done:
                        self._queue.appendleft(p)
            raise

    def _run_one(self, p: _Pending) -> None:
        try:
            p.result = self._run(p.call)
        except Exception as e:  # noqa: BLE001 - delivered to its caller
            p.error = e
        p.done = True
        self.passes += 1

    def _run_merged(self, group: List[_Pending]) -> None:
        merged = replace(group[0].call, sequences=[s for p in group for s in p.call.sequences])
        try:
            result = self._run(merged)
        except Exception:  # noqa: BLE001 - find whose call it was: one pass per call
            for p in group:
                self._run_one(p)
            return
        self.passes += 1
        self.merged_calls += len(group)
        start = 0
        for p in group:
            n = len(p.call.sequences)
            p.result = EncoderResult(sequences=result.sequences[start : start + n])
            p.done = True
            start += n
