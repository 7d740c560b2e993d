"""Watch a relayed response body for timings and the final usage, without touching it.

The proxy hands every chunk it relays to an observer, with the time it arrived. The
observer never changes or holds back a byte; it only keeps what it needs:

- `StreamObserver` (SSE): the time of the first event that carries generated text — a
  content, reasoning or tool-call delta, not the first byte, not the role-only opening
  chunk, not a keep-alive comment — the time of the last such event, and the usage from
  the event that carries it (the neuron sends it last). Chat completions, text
  completions and Responses API streams are understood.
- `BodyObserver` (a JSON body): the usage of the complete response.

Both are pure: time is passed in, so tables of chunks test them without a clock. Events
are decoded one by one only until the first token; after it, a chunk costs a few byte
searches, and only the last event that mentions `"usage"` is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

# A non-streamed body larger than this is relayed but not parsed for usage.
MAX_OBSERVED_BODY_BYTES = 4 * 1024 * 1024
# An SSE event still incomplete at this size is dropped from observation (never from the relay).
MAX_PENDING_EVENT_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Observation:
    """What a response body told us. Times are in the caller's clock (perf_counter)."""

    streamed: bool
    first_byte_at: float | None = None
    # First and last event carrying generated text; None for non-streamed bodies.
    first_token_at: float | None = None
    last_token_at: float | None = None
    usage: Usage | None = None


class Observer(Protocol):
    def feed(self, chunk: bytes, now: float) -> None: ...

    def finish(self) -> Observation: ...


# Wire shapes: only the fields the observer reads; msgspec skips the rest while parsing.
class _Details(msgspec.Struct):
    cached_tokens: int | None = None


class _WireUsage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_tokens_details: _Details | None = None
    # Responses API names.
    input_tokens: int | None = None
    output_tokens: int | None = None
    input_tokens_details: _Details | None = None

    def to_usage(self) -> Usage:
        prompt = self.prompt_tokens if self.prompt_tokens is not None else self.input_tokens
        completion = self.completion_tokens if self.completion_tokens is not None else self.output_tokens
        details = self.prompt_tokens_details or self.input_tokens_details
        return Usage(prompt, completion, details.cached_tokens if details else None)


class _Delta(msgspec.Struct):
    content: Any = None
    reasoning_content: Any = None
    reasoning: Any = None
    tool_calls: Any = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    # Text completions stream `text` instead of a delta.
    text: Any = None


class _ResponseObject(msgspec.Struct):
    usage: _WireUsage | None = None


class _Event(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: _WireUsage | None = None
    # Responses API: `type` names the event, `delta` carries the text of `*.delta` events,
    # `response` (on response.completed) carries the usage.
    type: str | None = None
    delta: Any = None
    response: _ResponseObject | None = None


_EVENT_DECODER = msgspec.json.Decoder(_Event)


def _has_text(value: Any) -> bool:
    # A string delta counts when it is non-empty; tool_calls (a list) when present.
    return bool(value)


def _carries_token(event: _Event) -> bool:
    if event.choices:
        for choice in event.choices:
            delta = choice.delta
            if delta is not None and (
                _has_text(delta.content)
                or _has_text(delta.reasoning_content)
                or _has_text(delta.reasoning)
                or _has_text(delta.tool_calls)
            ):
                return True
            if _has_text(choice.text):
                return True
        return False
    return event.type is not None and event.type.endswith(".delta") and _has_text(event.delta)


def _usage_of(event: _Event) -> _WireUsage | None:
    if event.usage is not None:
        return event.usage
    if event.response is not None:
        return event.response.usage
    return None


def _data_of(event: bytes) -> bytes | None:
    """The payload of one SSE event (data lines joined), or None for comments and empty events."""
    if event.startswith(b"data:") and b"\n" not in event:
        return event[5:].strip()  # the common case: one `data:` line
    lines = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


class StreamObserver:
    """Incremental SSE reader: events may be split across chunks or packed into one."""

    __slots__ = ("_first_byte_at", "_first_token_at", "_last_token_at", "_pending", "_usage")

    def __init__(self) -> None:
        self._pending = b""
        self._first_byte_at: float | None = None
        self._first_token_at: float | None = None
        self._last_token_at: float | None = None
        self._usage: Usage | None = None

    def feed(self, chunk: bytes, now: float) -> None:
        if not chunk:
            return
        if self._first_byte_at is None:
            self._first_byte_at = now
        data = self._pending + chunk if self._pending else chunk
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        end = data.rfind(b"\n\n")
        if end < 0:
            # No event complete yet; an upstream that never ends one is not followed forever.
            self._pending = data if len(data) <= MAX_PENDING_EVENT_BYTES else b""
            return
        # What follows the last blank line is an event still arriving.
        self._pending = data[end + 2 :]
        complete = data[:end]
        if self._first_token_at is None:
            complete = self._until_first_token(complete, now)
        if complete:
            self._after_first_token(complete, now)

    def _until_first_token(self, data: bytes, now: float) -> bytes:
        """Decode events one by one until one carries a token; returns the events after it."""
        start, size = 0, len(data)
        while start < size:
            stop = data.find(b"\n\n", start)
            if stop < 0:
                stop = size
            self._event(data[start:stop], now)
            start = stop + 2
            if self._first_token_at is not None:
                return data[start:]
        return b""

    def _after_first_token(self, data: bytes, now: float) -> None:
        """Whole events after the first token: only the last one mentioning usage is decoded.

        Every other data event is generation going on (or its finish chunk), which only moves
        the last-token time; this keeps a chunk's cost to a few byte searches.
        """
        at = data.rfind(b'"usage"')
        if at < 0:
            if _has_data_event(data):
                self._last_token_at = now
            return
        begin = data.rfind(b"\n\n", 0, at)
        begin = 0 if begin < 0 else begin + 2
        end = data.find(b"\n\n", at)
        end = len(data) if end < 0 else end
        if _has_data_event(data[:begin]):
            self._last_token_at = now
        self._event(data[begin:end], now)

    def _event(self, raw: bytes, now: float) -> None:
        payload = _data_of(raw)
        if not payload or payload == b"[DONE]":
            return
        try:
            event = _EVENT_DECODER.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return  # not an OpenAI-shaped event: relayed, but tells us nothing
        if _carries_token(event):
            if self._first_token_at is None:
                self._first_token_at = now
            self._last_token_at = now
        usage = _usage_of(event)
        if usage is not None:
            self._usage = usage.to_usage()

    def finish(self) -> Observation:
        if self._pending:
            # A stream may end without the final blank line; its last event still counts.
            pending, self._pending = self._pending.rstrip(b"\n"), b""
            now = self._last_token_at or self._first_byte_at or 0.0
            if self._first_token_at is None:
                self._until_first_token(pending, now)
            else:
                self._after_first_token(pending, now)
        return Observation(
            streamed=True,
            first_byte_at=self._first_byte_at,
            first_token_at=self._first_token_at,
            last_token_at=self._last_token_at,
            usage=self._usage,
        )


def _has_data_event(events: bytes) -> bool:
    # More `data:` lines than `[DONE]` markers: some event other than the terminator.
    return events.count(b"data:") > events.count(b"[DONE]")


class _Body(msgspec.Struct):
    usage: _WireUsage | None = None


_BODY_DECODER = msgspec.json.Decoder(_Body)


class BodyObserver:
    """Collects a non-streamed JSON body (bounded) and reads its usage at the end."""

    __slots__ = ("_chunks", "_first_byte_at", "_size")

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._first_byte_at: float | None = None

    def feed(self, chunk: bytes, now: float) -> None:
        if not chunk:
            return
        if self._first_byte_at is None:
            self._first_byte_at = now
        self._size += len(chunk)
        if self._size <= MAX_OBSERVED_BODY_BYTES:
            self._chunks.append(chunk)
        else:
            self._chunks.clear()

    def finish(self) -> Observation:
        usage: Usage | None = None
        if self._chunks and self._size <= MAX_OBSERVED_BODY_BYTES:
            body = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
            try:
                wire = _BODY_DECODER.decode(body).usage
            except (msgspec.DecodeError, msgspec.ValidationError):
                wire = None  # not JSON (or not an OpenAI body): relayed, not measured
            usage = wire.to_usage() if wire is not None else None
        return Observation(streamed=False, first_byte_at=self._first_byte_at, usage=usage)


def observer_for(content_type: str | None) -> Observer:
    """SSE bodies are read event by event; anything else as one JSON document."""
    if content_type is not None and content_type.startswith("text/event-stream"):
        return StreamObserver()
    return BodyObserver()
