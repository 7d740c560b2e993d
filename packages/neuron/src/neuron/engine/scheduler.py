"""The continuous-batching scheduler: what runs on the device's owner thread, one step at a time.

A sequence is *waiting* (no K/V yet), *prefilling* (its prompt's blocks are held and being
computed chunk by chunk) or *running* (decoding one token a step). A step:

1. drops cancelled sequences;
2. gives every running sequence room for its next token, preempting the youngest
   sequences when the pool is out of blocks;
3. prefills at most `prefill_budget_tokens` prompt tokens in one forward: first the
   sequences already prefilling, then waiting ones admitted in order while the batch has
   room and the pool has blocks for the whole prompt (a prefix-cache hit needs fewer);
4. decodes every running sequence in one forward.

So a long prompt costs the running streams one chunk per step, never its whole prefill, and
K/V memory is held by tokens in flight.

A request for n choices queues one sequence carrying the other n - 1 as `forks`. When its
prompt is computed, each fork shares the prompt's blocks before the one that holds the
last prompt position (reference counted, never written again) and recomputes only the rest
in blocks of its own: at most one block of tokens, which also gives the fork its own first
logits. So the prompt is computed once, and no K/V is copied (a copy would need a kernel on
every tensor-parallel rank; the tail costs what a decode step of a few rows costs). A fork
that finds no room (batch or blocks), and every fork on a hybrid model (whose recurrent
state cannot be shared by blocks), waits at the head of the queue as a sequence of its own. A preempted sequence gives its blocks back (its full
ones stay in the prefix cache) and waits at the head of the queue; when readmitted it
recomputes prompt + generated tokens (mostly from the prefix cache) and carries on where it
stopped, so its output is the same. Events leave the step through each sequence's `sink`;
the scheduler itself never touches asyncio.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from neuron.engine.api import FinishReason, GenerationRequest, TokenEvent
from neuron.engine.blocks import BlockPool, BlockTable, blocks_for
from neuron.engine.constraint import ConstraintViolation, MaskFiller
from neuron.engine.paged import ForwardRow
from neuron.engine.runner import ModelRunner
from neuron.engine.sampling import SampledToken, SamplerState, sample_tokens

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
    # Prompt then generated ids; the K/V of the first `computed` is in `table`'s blocks.
    tokens: list[int] = field(default_factory=list)
    computed: int = 0
    table: BlockTable = field(default_factory=BlockTable)
    # Admission order (older sequences are preempted last); set at each admission.
    admitted: int = -1
    # A hybrid model's linear-attention state slot while admitted (-1: none).
    state_slot: int = -1
    preemptions: int = 0
    # OpenAI's `n`: the other choices of this request, waiting for this one's prompt K/V
    # to fork from (`Scheduler._fork`); empty once forked.
    forks: list[SeqState] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.request.prompt_ids)

    @property
    def cache_key_tokens(self) -> list[int]:
        """What the prefix cache keys this sequence's blocks by: its tokens, except that an
        image's placeholder positions carry a salt from its pixels (vision/inputs.py)."""
        images = self.request.images
        if images is None:
            return self.tokens
        return [*images.key_ids, *self.tokens[len(images.key_ids) :]]

    @property
    def completion_tokens(self) -> int:
        return len(self.sampler.generated)

    @property
    def prefill_target(self) -> int:
        """Positions to compute before decoding: the prompt, or, after a preemption, every
        token but the last generated one (which the next decode step feeds)."""
        return len(self.tokens) - 1 if self.sampler.generated else len(self.tokens)


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
    """Owner-thread state: waiting, prefilling and running sequences, the block pool and the runner."""

    def __init__(
        self,
        runner: ModelRunner,
        *,
        max_batch_size: int,
        prefill_budget_tokens: int,
        on_finished: Callable[[SeqState], None],
        prefix_caching: bool = True,
    ) -> None:
        self.runner = runner
        self.prefill_budget_tokens = max(1, prefill_budget_tokens)
        self.on_finished = on_finished
        # A hybrid model's linear-attention state sums up a whole prefix and cannot be
        # rebuilt from shared blocks: no prefix reuse for it (cached_tokens stays 0), and at
        # most one sequence per state slot.
        self.state_slots: deque[int] = deque(range(runner.state_slots))
        if runner.state_slots:
            prefix_caching = False
            max_batch_size = min(max_batch_size, runner.state_slots)
        self.max_batch_size = max_batch_size
        self.prefix_caching = prefix_caching
        self.blocks = BlockPool(runner.num_blocks, runner.block_size)
        # Appended from the event loop's thread (deque appends are atomic), popped here.
        self.incoming: deque[SeqState] = deque()
        self.waiting: deque[SeqState] = deque()
        self.prefilling: list[SeqState] = []
        self.running: list[SeqState] = []
        self.throughput = Throughput()
        self.preemptions = 0
        self._admissions = itertools.count()
        self._masks = MaskFiller()

    @property
    def max_sequence_tokens(self) -> int:
        """The longest sequence the pool can hold at all (every usable block)."""
        return self.blocks.usable_blocks * self.blocks.block_size

    def has_work(self) -> bool:
        return bool(self.incoming or self.waiting or self.prefilling or self.running)

    def step(self, flush: Callable[[], None]) -> None:
        """One scheduling round; `flush` pushes the events produced so far to their consumers."""
        while self.incoming:
            self.waiting.append(self.incoming.popleft())
        self._drop_cancelled()
        decoding = self._reserve_decode_slots()
        chunks = self._plan_prefill()
        if chunks:
            self._prefill(chunks)
            flush()  # first tokens go out now, not after the decode step below
        decoding = [seq for seq in decoding if seq in self.running and not seq.cancelled]
        if decoding:
            self._decode(decoding)

    # --- planning ----------------------------------------------------------------------

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            self._finish(seq, None)
        for group in (self.prefilling, self.running):
            for seq in [s for s in group if s.cancelled]:
                group.remove(seq)
                self._finish(seq, None)

    def _reserve_decode_slots(self) -> list[SeqState]:
        """Blocks for every running sequence's next token, oldest first; the youngest
        sequences are preempted when the pool runs out."""
        ready: list[SeqState] = []
        for seq in sorted(self.running, key=lambda s: s.admitted):
            if seq not in self.running:
                continue  # preempted for an older one in this loop
            if self._grow(seq, seq.computed + 1):
                ready.append(seq)
            else:
                self._preempt(seq)
        return ready

    def _grow(self, seq: SeqState, positions: int) -> bool:
        """Make `seq`'s table cover `positions`, preempting younger sequences if needed."""
        needed = blocks_for(positions, self.blocks.block_size) - len(seq.table.blocks)
        if needed <= 0:
            return True
        while self.blocks.available < needed:
            victim = self._youngest(other_than=seq)
            if victim is None:
                return False
            self._preempt(victim)
        taken = self.blocks.allocate(needed)
        assert taken is not None
        seq.table.blocks.extend(taken)
        return True

    def _youngest(self, other_than: SeqState) -> SeqState | None:
        candidates = [
            s
            for s in (*self.prefilling, *self.running)
            if s is not other_than and s.admitted > other_than.admitted
        ]
        return max(candidates, key=lambda s: s.admitted, default=None)

    def _preempt(self, seq: SeqState) -> None:
        """Give `seq`'s blocks back and queue it first; it recomputes its K/V when readmitted."""
        for group in (self.prefilling, self.running):
            if seq in group:
                group.remove(seq)
        self._release_blocks(seq)
        seq.computed = 0
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def _plan_prefill(self) -> list[tuple[SeqState, int]]:
        """(sequence, tokens to compute) for this step's prefill forward, within the budget."""
        budget = self.prefill_budget_tokens
        chunks: list[tuple[SeqState, int]] = []
        for seq in self.prefilling:
            if budget <= 0:
                break
            count = min(seq.prefill_target - seq.computed, budget)
            chunks.append((seq, count))
            budget -= count
        while budget > 0 and self.waiting and len(self.running) + len(self.prefilling) < self.max_batch_size:
            seq = self.waiting[0]
            if not self._admit(seq):
                break  # in order: a long prompt waits for blocks rather than being overtaken forever
            self.waiting.popleft()
            self.prefilling.append(seq)
            count = min(seq.prefill_target - seq.computed, budget)
            chunks.append((seq, count))
            budget -= count
        return chunks

    def _admit(self, seq: SeqState) -> bool:
        """Take the blocks for `seq`'s whole prefill (cached ones shared) if the pool has them,
        keeping one spare block per active sequence for their growth."""
        target = seq.prefill_target
        matched: list[int] = []
        keys: list[int] = []
        if self.prefix_caching:
            # At least the last position is computed: its logits pick the next token.
            matched, keys = self.blocks.match_prefix(seq.cache_key_tokens, target - 1)
        fresh = blocks_for(target, self.blocks.block_size) - len(matched)
        spare = len(self.running) + len(self.prefilling)
        taken = self.blocks.allocate(fresh) if self.blocks.available >= fresh + spare else None
        if taken is None:
            self.blocks.release(matched)
            return False
        seq.table = BlockTable(blocks=[*matched, *taken], keys=keys)
        if self.state_slots:
            seq.state_slot = self.state_slots.popleft()
        seq.computed = len(matched) * self.blocks.block_size
        seq.admitted = next(self._admissions)
        if seq.preemptions == 0:  # what the client is told: its own earlier K/V does not count
            seq.cached_tokens = seq.computed
        return True

    # --- execution ---------------------------------------------------------------------

    def _prefill(self, chunks: list[tuple[SeqState, int]]) -> None:
        """One forward for every chunk; if it fails, one by one, so that only the sequences
        that fail alone fail (a failed forward wrote only slots its rows own)."""
        started = time.perf_counter()
        rows = [
            ForwardRow(
                seq.tokens[seq.computed : seq.computed + n],
                seq.computed,
                seq.table.blocks,
                seq.state_slot,
                seq.request.images,
            )
            for seq, n in chunks
        ]
        outcomes: list[torch.Tensor | Exception]
        try:
            outcomes = list(self.runner.forward(rows).unbind(0))
        except (
            Exception
        ) as batch_failure:  # retried one by one below, where each failure reaches its sequence
            if len(rows) == 1:
                outcomes = [batch_failure]
            else:
                outcomes = []
                for row in rows:
                    try:
                        outcomes.append(self.runner.forward([row])[0])
                    except Exception as exc:
                        exc.add_note(
                            f"the batched prefill with its companions failed first: {batch_failure!r}"
                        )
                        outcomes.append(exc)
        computed = 0
        finished: list[tuple[SeqState, torch.Tensor]] = []
        for (seq, count), outcome in zip(chunks, outcomes, strict=True):
            if isinstance(outcome, Exception):
                self.prefilling.remove(seq)
                self._fail(seq, outcome)
                continue
            seq.computed += count
            computed += count
            self._commit(seq)
            if seq.computed < seq.prefill_target:
                continue
            self.prefilling.remove(seq)
            if seq.forks:
                # Before its first token: a first token that ends it would release its blocks.
                self._fork(seq, joining=len(finished) + 1)
            if seq.sampler.generated:  # resumed after a preemption: its next token is known
                self.running.append(seq)
                continue
            finished.append((seq, outcome))
        if finished:
            self._first_tokens(finished)
        tp = self.throughput
        tp.prefill_tok_s = tp.blend(tp.prefill_tok_s, computed, time.perf_counter() - started)

    def _fork(self, parent: SeqState, *, joining: int) -> None:
        """Start `parent`'s forks on its computed prompt (see the module docstring);
        `joining` sequences are about to run without being in `running` yet."""
        children, parent.forks = parent.forks, []
        size = self.blocks.block_size
        # The blocks wholly before the last prompt position: the fork computes that position.
        shared = parent.table.blocks[: (len(parent.request.prompt_ids) - 1) // size]
        queued: list[SeqState] = []
        for child in children:
            if child.cancelled:
                self._finish(child, None)
                continue
            active = len(self.running) + len(self.prefilling) + joining
            fresh = blocks_for(child.prefill_target, size) - len(shared)
            if self.runner.state_slots or active >= self.max_batch_size:
                queued.append(child)
                continue
            taken = self.blocks.allocate(fresh) if self.blocks.available >= fresh + active else None
            if taken is None:
                queued.append(child)
                continue
            self.blocks.share(shared)
            child.table = BlockTable(blocks=[*shared, *taken], keys=parent.table.keys[: len(shared)])
            child.computed = len(shared) * size
            child.cached_tokens = parent.cached_tokens
            child.admitted = next(self._admissions)
            self.prefilling.append(child)
        self.waiting.extendleft(reversed(queued))

    def _release_forks(self, seq: SeqState) -> None:
        """A sequence that ends before forking leaves its forks to run on their own."""
        children, seq.forks = seq.forks, []
        self.waiting.extendleft(reversed(children))

    def _first_tokens(self, finished: list[tuple[SeqState, torch.Tensor]]) -> None:
        """Sample the first token of every sequence whose prefill ended this step in one batch
        (one copy back from the device); if that fails, one by one, so that only a request
        that fails alone fails."""
        tokens: list[SampledToken | Exception]
        samplers = [s.sampler for s, _ in finished]
        try:
            masks = self._masks.fill([sampler.constraint for sampler in samplers])
            tokens = list(sample_tokens(torch.stack([logits for _, logits in finished]), samplers, masks))
        except Exception:  # retried one by one below, where each failure reaches its sequence
            tokens = []
            for seq, logits in finished:
                try:
                    masks = self._masks.fill([seq.sampler.constraint])
                    tokens.append(sample_tokens(logits[None], [seq.sampler], masks)[0])
                except Exception as exc:
                    tokens.append(exc)
        for (seq, _), token in zip(finished, tokens, strict=True):
            if isinstance(token, Exception):
                self._fail(seq, token)
            elif self._accept(seq, token):
                self.running.append(seq)

    def _decode(self, batch: list[SeqState]) -> None:
        started = time.perf_counter()
        rows = [
            ForwardRow([seq.last_token], seq.computed, seq.table.blocks, seq.state_slot, seq.request.images)
            for seq in batch
        ]
        samplers = [s.sampler for s in batch]
        try:
            # Before the forward: on a GPU the masks are computed while the device works.
            masks = self._masks.fill([sampler.constraint for sampler in samplers])
            tokens = sample_tokens(self.runner.forward(rows), samplers, masks)
        except Exception as exc:  # a failed batched forward takes every member with it
            for seq in batch:
                self.running.remove(seq)
                self._fail(seq, exc)
            return
        tp = self.throughput
        tp.decode_tok_s = tp.blend(tp.decode_tok_s, len(batch), time.perf_counter() - started)
        for seq, token in zip(batch, tokens, strict=True):
            seq.computed += 1
            self._commit(seq)
            if seq.cancelled:
                continue  # dropped at the next step; its token is never seen
            if not self._accept(seq, token):
                self.running.remove(seq)

    def _commit(self, seq: SeqState) -> None:
        if self.prefix_caching and seq.computed // self.blocks.block_size > len(seq.table.keys):
            self.blocks.commit(seq.table, seq.cache_key_tokens, seq.computed)

    def _accept(self, seq: SeqState, sampled: SampledToken) -> bool:
        """Emit the sampled token for `seq`; False when the sequence has ended (and was finished)."""
        token = sampled.token
        if token in seq.request.stop_token_ids:
            self._finish(seq, "stop")
            return False
        constraint = seq.sampler.constraint
        if constraint is not None:
            try:
                constraint.accept(token)
            except ConstraintViolation as exc:
                self._fail(seq, exc)
                return False
        seq.sampler.record(token)
        seq.tokens.append(token)
        seq.last_token = token
        # A complete grammar ends the answer even when the token budget ends with it.
        finish: FinishReason | None = None
        if constraint is not None and constraint.finished:
            finish = "stop"
        elif seq.completion_tokens >= seq.max_new_tokens:
            finish = "length"
        event = self._event(seq, token, finish)
        if sampled.logprob is not None:
            event = replace(event, logprob=sampled.logprob, top_logprobs=sampled.top_logprobs)
        seq.sink.put(event)
        if finish is not None:
            self._finish(seq, None)
        return finish is None

    def _event(self, seq: SeqState, token: int | None, finish: FinishReason | None) -> TokenEvent:
        return TokenEvent(
            token_id=token,
            finish_reason=finish,
            prompt_tokens=len(seq.request.prompt_ids),
            cached_tokens=seq.cached_tokens,
            completion_tokens=seq.completion_tokens,
        )

    def _release_blocks(self, seq: SeqState) -> None:
        self.blocks.release(seq.table.blocks)
        seq.table = BlockTable()
        if seq.state_slot >= 0:
            self.state_slots.append(seq.state_slot)
            seq.state_slot = -1

    def _finish(self, seq: SeqState, reason: FinishReason | None) -> None:
        """End a sequence: a final event when `reason` is given, its blocks released, counted out."""
        if seq.finished:
            return
        seq.finished = True
        if reason is not None:
            seq.sink.put(self._event(seq, None, reason))
        self._release_blocks(seq)
        self._release_forks(seq)
        self.on_finished(seq)

    def _fail(self, seq: SeqState, exc: BaseException) -> None:
        if seq.finished:
            return
        seq.sink.put(exc)
        seq.finished = True
        self._release_blocks(seq)
        self._release_forks(seq)
        self.on_finished(seq)

    def fail_all(self, reason: Callable[[], BaseException]) -> None:
        """Fail everything queued or running with a fresh `reason()`."""
        while self.incoming:
            self.waiting.append(self.incoming.popleft())
        doomed = [*self.waiting, *self.prefilling, *self.running]
        doomed += [fork for seq in doomed for fork in seq.forks]
        for seq in doomed:
            seq.forks = []
        for seq in doomed:
            self._fail(seq, reason())
        self.waiting.clear()
        self.prefilling.clear()
        self.running.clear()

    def shutdown(self, reason: Callable[[], BaseException]) -> None:
        """Fail everything still queued or running, then close the runner."""
        self.fail_all(reason)
        self.runner.close()

    def kv_usage(self) -> tuple[int, int]:
        """(blocks held by sequences, usable blocks)."""
        return self.blocks.in_use, self.blocks.usable_blocks
