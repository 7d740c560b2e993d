"""TorchEngine: the async face of one model's scheduler.

The event loop never runs torch. `generate()` validates and queues a request and returns a
stream; the scheduler's steps run as jobs on the device's owner thread, each step
resubmitting the next while there is work, so other jobs for that device (another model's
steps, a load) interleave between steps instead of waiting behind an endless loop. Events
come back through `loop.call_soon_threadsafe`, once per flush, for all streams at once.

A sticky device error (`faults.device_fault`) in any step marks the engine faulted: later
requests are refused with the reason, and `on_device_fault` tells the owner (the manager
poisons every model on that device), from the owner thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

from cortex_core.config.neuron import EngineConfig
from cortex_core.errors import ApiError
from cortex_core.neuron_api import ModelLoad
from neuron.device import DeviceWorker
from neuron.engine.api import GenerationRequest, TokenEvent
from neuron.engine.faults import device_fault
from neuron.engine.runner import ModelRunner
from neuron.engine.sampling import SamplerState
from neuron.engine.scheduler import Scheduler, SeqState

# Suggested wait for a client refused because the queue is full.
QUEUE_FULL_RETRY_AFTER_SECS = 2.0


class _Outbox:
    """Events produced on the owner thread, handed to the event loop in batches."""

    def __init__(self, on_error: Callable[[BaseException], None]) -> None:
        self._pending: list[tuple[TokenStream, TokenEvent | BaseException]] = []
        # Sees every failure handed to a stream, whichever step path produced it.
        self._on_error = on_error

    def sink_for(self, stream: TokenStream) -> _StreamSink:
        return _StreamSink(self, stream)

    def add(self, stream: TokenStream, item: TokenEvent | BaseException) -> None:
        if isinstance(item, BaseException):
            self._on_error(item)
        self._pending.append((stream, item))

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[TokenStream, TokenEvent | BaseException]]] = {}
        for stream, item in pending:
            by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                for stream, _ in items:
                    stream.sequence.cancelled = True


def _deliver(items: list[tuple[TokenStream, TokenEvent | BaseException]]) -> None:
    for stream, item in items:
        stream.queue.put_nowait(item)


class _StreamSink:
    def __init__(self, outbox: _Outbox, stream: TokenStream) -> None:
        self._outbox = outbox
        self._stream = stream

    def put(self, item: TokenEvent | BaseException) -> None:
        self._outbox.add(self._stream, item)


class TokenStream(AsyncIterator[TokenEvent]):
    """The events of one request. Closing it (or dropping it) cancels the sequence."""

    def __init__(self, engine: TorchEngine, loop: asyncio.AbstractEventLoop) -> None:
        self._engine = engine
        self.loop = loop
        self.queue: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        self.sequence: SeqState
        self._done = False

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._done:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finish_reason is not None:
            self._done = True
        return item

    async def aclose(self) -> None:
        self.cancel()

    def cancel(self) -> None:
        """Free the slot at the next step (no-op once the stream has ended)."""
        if self._done:
            return
        self._done = True
        self.sequence.cancelled = True
        self._engine._count_out(self.sequence)
        self._engine._wake()

    def __del__(self) -> None:
        # A consumer that forgot to close its stream still frees the slot when it is dropped.
        # No wake-up here (this may run inside any lock, mid-step): an unfinished sequence
        # keeps the step chain alive, and the next step drops it.
        if not self._done and hasattr(self, "sequence"):
            self.sequence.cancelled = True


class TorchEngine:
    def __init__(
        self,
        runner: ModelRunner,
        *,
        worker: DeviceWorker,
        config: EngineConfig | None = None,
        model_id: str = "",
        on_device_fault: Callable[[str], None] | None = None,
    ) -> None:
        self.runner = runner
        self.worker = worker
        self.config = config or EngineConfig()
        self.model_id = model_id
        self._on_device_fault = on_device_fault
        # Why the device is unusable, once a step hit a sticky device error (owner thread writes once).
        self.fault: str | None = None
        self._outbox = _Outbox(on_error=self._note_failure)
        self._scheduler = Scheduler(
            runner,
            max_batch_size=self.config.max_batch_size,
            prefill_budget_tokens=self.config.prefill_chunk_tokens,
            on_finished=self._on_finished,
            prefix_caching=self.config.prefix_caching,
        )
        self._seq_ids = itertools.count()
        self._lock = threading.Lock()
        self._accepted = 0  # queued + running, guarded by _lock
        self._step_pending = False  # a step job is queued or running on the worker
        self._closing = False
        self._closed: concurrent.futures.Future[None] | None = None

    # --- async side -------------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> TokenStream:
        """Validate and queue; raises ApiError (400 context overflow, 503 full/closing) at once."""
        return self.generate_choices(request, 1)[0]

    def generate_choices(self, request: GenerationRequest, n: int) -> list[TokenStream]:
        """`n` sequences from one prompt (OpenAI's `n`), one stream each, prefilled once: the
        first computes the prompt and the others fork from it (scheduler.py). Choice i > 0
        samples with seed + i when the request has a seed. Each counts against the queue
        limit; raises like `generate`."""
        if n < 1:
            raise ApiError(400, f"n must be at least 1, got {n}", code="invalid_parameter", param="n")
        prompt = len(request.prompt_ids)
        if prompt == 0:
            raise ApiError(400, "the prompt is empty", code="empty_prompt", param="messages")
        vocab = self.runner.vocab_size
        outside = [token for token in request.prompt_ids if not 0 <= token < vocab]
        if outside:
            # An id past the embedding's rows is a device-side assert on a GPU, which would
            # take every model on that device down with it.
            raise ApiError(
                400,
                f"token ids outside this model's vocabulary (0..{vocab - 1}): {outside[:5]}",
                code="invalid_parameter",
                param="prompt",
            )
        biased = [token for token, _ in request.sampling.logit_bias if not 0 <= token < vocab]
        if biased:
            # Same reason: a biased id indexes the logits on the device.
            raise ApiError(
                400,
                f"logit_bias: token ids outside this model's vocabulary (0..{vocab - 1}): {biased[:5]}",
                code="invalid_parameter",
                param="logit_bias",
            )
        if self.fault is not None:
            raise ApiError(
                500,
                f"model {self.model_id} cannot run: its device failed ({self.fault}); "
                "unload and load it again to recover",
                code="model_poisoned",
            )
        max_new = max(1, request.max_new_tokens)
        limit = self.max_context
        if prompt + max_new > limit:
            raise ApiError(
                400,
                f"this model's maximum context length is {limit} tokens, but the request needs "
                f"{prompt + max_new}: {prompt} in the prompt plus max_tokens {max_new}; "
                "shorten the prompt or lower max_tokens",
                code="context_length_exceeded",
                param="max_tokens",
                # The numbers as fields too, for the gateway's Anthropic wording.
                extras={"prompt_len": prompt, "max_tokens": max_new, "max": limit},
            )
        loop = asyncio.get_running_loop()
        stream = TokenStream(self, loop)
        with self._lock:
            if self._closing:
                raise ApiError(
                    503, f"model {self.model_id} is unloading", retry_after=QUEUE_FULL_RETRY_AFTER_SECS
                )
            capacity = self.config.max_batch_size + self.config.max_queue_depth
            if self._accepted + n > capacity:
                raise ApiError(
                    503,
                    f"model {self.model_id} is busy: {self._accepted} requests running or queued "
                    f"(limit {capacity}); retry later",
                    code="queue_full",
                    retry_after=QUEUE_FULL_RETRY_AFTER_SECS,
                )
            self._accepted += n
            seq_ids = [next(self._seq_ids) for _ in range(n)]
        streams = [stream, *(TokenStream(self, loop) for _ in range(n - 1))]
        seed = request.sampling.seed
        for index, (each, seq_id) in enumerate(zip(streams, seq_ids, strict=True)):
            sampling = request.sampling if seed is None else replace(request.sampling, seed=seed + index)
            # A grammar's state moves with its sequence: every further choice gets its own.
            constraint = request.constraint
            if constraint is not None and index > 0:
                constraint = constraint.fork()
            each.sequence = SeqState(
                seq_id=seq_id,
                request=request,
                sink=self._outbox.sink_for(each),
                sampler=SamplerState.create(sampling, constraint),
                max_new_tokens=max_new,
            )
        first = streams[0].sequence
        first.forks = [each.sequence for each in streams[1:]]
        self._scheduler.incoming.append(first)
        self._wake()
        return streams

    @property
    def kv_cache_bytes(self) -> int:
        """Device memory of the runner's K/V pool (0 when the runner does not say)."""
        return int(getattr(self.runner, "kv_cache_bytes", 0))

    @property
    def vision(self) -> bool:
        """Whether the runner feeds images (a vision-language model loaded with its tower)."""
        return getattr(self.runner, "vision", None) is not None

    @property
    def max_context(self) -> int:
        """Prompt + new tokens allowed per request: the model's position limit or what the
        whole K/V pool holds, whichever is less (for resolving a default max_tokens)."""
        return min(self.runner.max_context, self._scheduler.max_sequence_tokens)

    def load(self) -> ModelLoad:
        running = len(self._scheduler.running) + len(self._scheduler.prefilling)
        used, total = self._scheduler.kv_usage()
        tp = self._scheduler.throughput
        return ModelLoad(
            id=self.model_id,
            in_flight=running,
            queue_depth=max(0, self._accepted - running),
            max_in_flight=self.config.max_batch_size,
            max_queue_depth=self.config.max_queue_depth,
            tok_s_prefill=round(tp.prefill_tok_s, 2),
            tok_s_decode=round(tp.decode_tok_s, 2),
            max_model_len=self.max_context,
            kv_blocks_used=used,
            kv_blocks_total=total,
        )

    async def close(self) -> None:
        """Fail queued and running requests with 503, stop stepping, free the runner."""
        with self._lock:
            self._closing = True
            if self._closed is None:
                self._closed = concurrent.futures.Future()
            closed = self._closed
        self._wake()
        await asyncio.wrap_future(closed)

    # --- owner-thread side ------------------------------------------------------------

    def _wake(self) -> None:
        with self._lock:
            if self._step_pending or (self._closed is not None and self._closed.done()):
                return
            self._step_pending = True
        self.worker.submit(self._step_job)

    def _step_job(self) -> None:
        try:
            if self._closing:
                self._shutdown()
                return
            self._scheduler.step(self._outbox.flush)
        except Exception as exc:  # a scheduler bug must not leave every stream waiting forever
            message = f"inference step failed: {exc!r}"
            self._scheduler.fail_all(lambda: RuntimeError(message))
            raise
        finally:
            self._outbox.flush()
            with self._lock:
                again = self._scheduler.has_work() or (self._closing and not self._is_closed())
                self._step_pending = again
            if again:
                self.worker.submit(self._step_job)

    def _shutdown(self) -> None:
        assert self._closed is not None

        def unloaded() -> ApiError:
            return ApiError(
                503, f"model {self.model_id} was unloaded", retry_after=QUEUE_FULL_RETRY_AFTER_SECS
            )

        if self._closed.done():
            # A request that slipped in while closing: refuse it, the runner is already gone.
            self._scheduler.fail_all(unloaded)
            return
        try:
            self._scheduler.shutdown(unloaded)
        except BaseException as exc:
            self._closed.set_exception(exc)
            raise
        else:
            self._closed.set_result(None)

    def _is_closed(self) -> bool:
        return self._closed is not None and self._closed.done()

    def _note_failure(self, exc: BaseException) -> None:
        """Owner thread: a failure reached a stream; a sticky device error faults the engine."""
        reason = device_fault(exc)
        if reason is None or self.fault is not None:
            return
        self.fault = reason
        if self._on_device_fault is not None:
            self._on_device_fault(reason)

    def _on_finished(self, seq: SeqState) -> None:
        self._count_out(seq)

    def _count_out(self, seq: SeqState) -> None:
        """The request no longer counts against the queue limit (once, whoever gets here first)."""
        with self._lock:
            if not seq.counted_out:
                seq.counted_out = True
                self._accepted -= 1
