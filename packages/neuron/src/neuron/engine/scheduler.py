"""The continuous-batching scheduler: what runs on the device's owner thread, one step at a time.

A step: drop cancelled sequences, admit waiting requests (one prefill call for all of them,
first tokens) while the batch has room and the step's prefill budget lasts, then decode every running sequence in
one forward. A sequence joins the batch when its prefill is done and leaves when it ends.
Events leave the step through `deliver`, a callback that hands them to the event loop; the
scheduler itself never touches asyncio.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from neuron.engine.api import FinishReason, GenerationRequest, TokenEvent
from neuron.engine.sampling import SamplerState, next_token, next_tokens
from neuron.runner import ModelRunner, PrefillResult

# How much a new measurement moves the tok/s averages reported by load().
EMA_WEIGHT = 0.2


class EventSink(Protocol):
    def put(self, item: TokenEvent | BaseException) -> None:
        """Queue an item for the consumer (called on the owner thread; must be thread-safe)."""
        ...


@dataclass
class SeqState:
    seq_id: int
    request: GenerationRequest
    sink: EventSink
    sampler: SamplerState
    max_new_tokens: int
    # Set from the event loop's thread when the consumer goes away; read at the next step.
    cancelled: bool = False
    # Guarded by the engine's lock: the request has left the admission count.
    counted_out: bool = False
    cached_tokens: int = 0
    last_token: int = -1
    finished: bool = False

    @property
    def completion_tokens(self) -> int:
        return len(self.sampler.generated)


@dataclass
class Throughput:
    prefill_tok_s: float = 0.0
    decode_tok_s: float = 0.0

    @staticmethod
    def blend(old: float, tokens: int, seconds: float) -> float:
        if tokens <= 0 or seconds <= 0:
            return old
        rate = tokens / seconds
        return rate if old == 0.0 else (1 - EMA_WEIGHT) * old + EMA_WEIGHT * rate


class Scheduler:
    """Owner-thread state: waiting requests, the running batch, and the runner they share."""

    def __init__(
        self,
        runner: ModelRunner,
        *,
        max_batch_size: int,
        prefill_budget_tokens: int,
        on_finished: Callable[[SeqState], None],
    ) -> None:
        self.runner = runner
        self.max_batch_size = max_batch_size
        self.prefill_budget_tokens = prefill_budget_tokens
        self.on_finished = on_finished
        # Appended from the event loop's thread (deque appends are atomic), popped here.
        self.incoming: deque[SeqState] = deque()
        self.waiting: deque[SeqState] = deque()
        self.running: list[SeqState] = []
        self.throughput = Throughput()

    def has_work(self) -> bool:
        return bool(self.incoming or self.waiting or self.running)

    def step(self, flush: Callable[[], None]) -> None:
        """One scheduling round; `flush` pushes the events produced so far to their consumers."""
        while self.incoming:
            self.waiting.append(self.incoming.popleft())
        self._drop_cancelled()
        if self._admit():
            flush()  # first tokens go out now, not after the decode step below
        if self.running:
            self._decode()

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            self._finish(seq, None, release=False)
        for seq in [s for s in self.running if s.cancelled]:
            self.running.remove(seq)
            self._finish(seq, None)

    def _admit(self) -> bool:
        """Prefill the requests that fit (batch room, step budget) together; True if any was tried."""
        group = self._admissible()
        if not group:
            return False
        started = time.perf_counter()
        computed = 0
        for seq, outcome in zip(group, self._prefill(group), strict=True):
            try:
                if isinstance(outcome, BaseException):
                    raise outcome
                token = next_token(outcome.logits, seq.sampler)
            except Exception as exc:  # this request fails; the others go on
                self._fail(seq, exc)
                continue
            computed += len(seq.request.prompt_ids) - outcome.cached_tokens
            seq.cached_tokens = outcome.cached_tokens
            if self._accept(seq, token):
                self.running.append(seq)
        tp = self.throughput
        tp.prefill_tok_s = tp.blend(tp.prefill_tok_s, computed, time.perf_counter() - started)
        return True

    def _admissible(self) -> list[SeqState]:
        """Waiting requests for this step: while the batch has room and their prompts fit the
        prefill budget (the first one always goes, however long)."""
        group: list[SeqState] = []
        budget = self.prefill_budget_tokens
        while self.waiting and len(self.running) + len(group) < self.max_batch_size:
            prompt = len(self.waiting[0].request.prompt_ids)
            if group and prompt > budget:
                break
            budget -= prompt
            group.append(self.waiting.popleft())
        return group

    def _prefill(self, group: list[SeqState]) -> list[PrefillResult | Exception]:
        """Prefill the group in one runner call; if that fails, one by one, so that only the
        requests that fail alone fail (the runner undoes a failed batch call)."""
        batch_failure: Exception | None = None
        if len(group) > 1:
            try:
                ids, prompts = [s.seq_id for s in group], [s.request.prompt_ids for s in group]
                return list(self.runner.prefill_batch(ids, prompts))
            except Exception as exc:  # retried one by one below, where each failure reaches its request
                batch_failure = exc
        outcomes: list[PrefillResult | Exception] = []
        for seq in group:
            try:
                outcomes.append(self.runner.prefill(seq.seq_id, seq.request.prompt_ids))
            except Exception as exc:
                if batch_failure is not None:
                    exc.add_note(f"the batched prefill with its companions failed first: {batch_failure!r}")
                outcomes.append(exc)
        return outcomes

    def _decode(self) -> None:
        batch = list(self.running)
        started = time.perf_counter()
        try:
            logits = self.runner.decode([s.seq_id for s in batch], [s.last_token for s in batch])
            tokens = next_tokens(logits, [s.sampler for s in batch])
        except Exception as exc:  # a failed batched forward takes every member with it
            self.running.clear()
            for seq in batch:
                self._fail(seq, exc)
            return
        tp = self.throughput
        tp.decode_tok_s = tp.blend(tp.decode_tok_s, len(batch), time.perf_counter() - started)
        for seq, token in zip(batch, tokens, strict=True):
            if seq.cancelled:
                continue  # dropped at the next step; its token is never seen
            if not self._accept(seq, token):
                self.running.remove(seq)

    def _accept(self, seq: SeqState, token: int) -> bool:
        """Emit `token` for `seq`; False when the sequence has ended (and was finished)."""
        if token in seq.request.stop_token_ids:
            self._finish(seq, "stop")
            return False
        seq.sampler.record(token)
        seq.last_token = token
        done = seq.completion_tokens >= seq.max_new_tokens
        seq.sink.put(self._event(seq, token, "length" if done else None))
        if done:
            self._finish(seq, None)
        return not done

    def _event(self, seq: SeqState, token: int | None, finish: FinishReason | None) -> TokenEvent:
        return TokenEvent(
            token_id=token,
            finish_reason=finish,
            prompt_tokens=len(seq.request.prompt_ids),
            cached_tokens=seq.cached_tokens,
            completion_tokens=seq.completion_tokens,
        )

    def _finish(self, seq: SeqState, reason: FinishReason | None, *, release: bool = True) -> None:
        """End a sequence: a final event when `reason` is given, its cache released, counted out."""
        if seq.finished:
            return
        seq.finished = True
        if reason is not None:
            seq.sink.put(self._event(seq, None, reason))
        if release:
            self.runner.release(seq.seq_id)
        self.on_finished(seq)

    def _fail(self, seq: SeqState, exc: BaseException) -> None:
        if seq.finished:
            return
        seq.sink.put(exc)
        seq.finished = True
        try:
            self.runner.release(seq.seq_id)
        except Exception as release_exc:  # the original failure is what the client needs to see
            exc.add_note(f"releasing the sequence also failed: {release_exc!r}")
        self.on_finished(seq)

    def fail_all(self, reason: Callable[[], BaseException]) -> None:
        """Fail everything queued or running with a fresh `reason()`."""
        while self.incoming:
            self.waiting.append(self.incoming.popleft())
        for seq in [*self.waiting, *self.running]:
            self._fail(seq, reason())
        self.waiting.clear()
        self.running.clear()

    def shutdown(self, reason: Callable[[], BaseException]) -> None:
        """Fail everything still queued or running, then close the runner."""
        self.fail_all(reason)
        self.runner.close()
