"""From engine token events to format-agnostic output events.

`OutputProcessor` is the pure part: token ids in, events out — detokenise, cut at stop
strings, split reasoning from content, parse tool calls. `generate_events` drives it from an
engine stream and ends the sequence (closing the engine iterator, which cancels it) as soon
as a stop string matched. The wire projections (chat, completions, responses) only format
these events.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass

from cortex_core.errors import ApiError
from neuron.engine.api import Engine, GenerationRequest, TokenEvent
from neuron.serving.detok import IncrementalDetokenizer
from neuron.serving.logprobs import LogprobsDelta, TokenTexts
from neuron.serving.reasoning import Channel, ReasoningMarkers, ReasoningSplitter, wrap_reasoning
from neuron.serving.stops import StopStringMatcher
from neuron.serving.tools import ContentDelta, ToolCallArguments, ToolCallParser, ToolCallStart


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" | "length" | "tool_calls"
    usage: Usage
    # The stop string that ended generation, when one did.
    stop_sequence: str | None = None


OutputEvent = TextDelta | ReasoningDelta | ToolCallStart | ToolCallArguments | LogprobsDelta | Finished
# An output event of one choice (OpenAI's `n`), by its index.
ChoiceEvent = tuple[int, OutputEvent]


def combined_usage(usages: Sequence[Usage]) -> Usage:
    """The usage of a request with several choices: the prompt (and its cached part) once,
    as it was computed once, and every choice's completion."""
    return Usage(
        prompt_tokens=usages[0].prompt_tokens,
        completion_tokens=sum(u.completion_tokens for u in usages),
        cached_tokens=usages[0].cached_tokens,
        reasoning_tokens=sum(u.reasoning_tokens for u in usages),
    )


class OutputProcessor:
    def __init__(
        self,
        detokenizer: IncrementalDetokenizer,
        *,
        stop_strings: tuple[str, ...] = (),
        markers: ReasoningMarkers | None = None,
        starts_in_reasoning: bool = False,
        include_thinking: bool = False,
        tool_parser: ToolCallParser | None = None,
        token_texts: TokenTexts | None = None,
    ) -> None:
        self._detok = detokenizer
        # Set when the request asked for log-probabilities: how to show each token.
        self._token_texts = token_texts
        self._stops = StopStringMatcher(stop_strings)
        self._markers = markers
        self._splitter = ReasoningSplitter(markers, in_reasoning=starts_in_reasoning)
        self._include_thinking = include_thinking
        self._thinking_open = False
        self._tools = tool_parser
        self.reasoning_tokens = 0
        # Usage as of the latest engine step (None until the prompt is prefilled).
        self.usage: Usage | None = None

    @property
    def stopped(self) -> bool:
        return self._stops.stopped

    @property
    def matched_stop(self) -> str | None:
        return self._stops.matched

    def _route(self, pieces: list[tuple[Channel, str]]) -> list[OutputEvent]:
        events: list[OutputEvent] = []
        for channel, piece in pieces:
            if channel == "reasoning":
                if self._include_thinking:
                    texts, self._thinking_open = wrap_reasoning(
                        [(channel, piece)], self._markers, inside=self._thinking_open
                    )
                    events.extend(TextDelta(text) for text in texts)
                else:
                    events.append(ReasoningDelta(piece))
                continue
            if self._thinking_open:
                events.append(TextDelta(self._markers.close if self._markers else ""))
                self._thinking_open = False
            events.extend(self._content(piece))
        return [event for event in events if not isinstance(event, TextDelta) or event.text]

    def _content(self, text: str) -> list[OutputEvent]:
        if self._tools is None:
            return [TextDelta(text)]
        return [_lift(event) for event in self._tools.push(text)]

    def observe(self, event: TokenEvent) -> None:
        self.usage = Usage(
            prompt_tokens=event.prompt_tokens,
            completion_tokens=event.completion_tokens,
            cached_tokens=event.cached_tokens,
            reasoning_tokens=min(self.reasoning_tokens, event.completion_tokens),
        )

    def on_token(self, event: TokenEvent) -> list[OutputEvent]:
        """The output of a token event (one that carries a token id)."""
        token_id = event.token_id
        assert token_id is not None
        was_reasoning = self._splitter.in_reasoning
        text = self._stops.push(self._detok.push(token_id))
        events = self._route(self._splitter.push(text))
        if self._token_texts is not None and event.logprob is not None:
            # Before the text it produced: a projection attaches it to the next chunk it
            # sends, which carries that text (or, held back, later text).
            logprobs = self._token_texts.delta(token_id, event.logprob, event.top_logprobs or ())
            events.insert(0, logprobs)
        if was_reasoning or self._splitter.in_reasoning:
            self.reasoning_tokens += 1
        return events

    def finish(self, engine_reason: str) -> tuple[list[OutputEvent], str]:
        """Flush everything held back; returns the last events and the final finish reason."""
        tail = self._detok.flush() if not self.stopped else ""
        text = self._stops.push(tail) + self._stops.flush()
        pieces = self._splitter.push(text) + self._splitter.flush()
        events = self._route(pieces)
        if self._thinking_open and self._markers is not None:
            events.append(TextDelta(self._markers.close))
            self._thinking_open = False
        if self._tools is not None:
            events.extend(_lift(event) for event in self._tools.finish())
            if self._tools.calls and engine_reason == "stop":
                engine_reason = "tool_calls"
        return [e for e in events if not isinstance(e, TextDelta) or e.text], engine_reason


def _lift(event: ContentDelta | ToolCallStart | ToolCallArguments) -> OutputEvent:
    return TextDelta(event.text) if isinstance(event, ContentDelta) else event


async def generate_events(
    engine: Engine, request: GenerationRequest, processor: OutputProcessor
) -> AsyncIterator[OutputEvent]:
    """Run one sequence; the last event is always `Finished`. Closing this iterator early
    (client gone) closes the engine stream, which cancels the sequence."""
    async for output in _drive(engine.generate(request), processor):
        yield output


async def generate_choices(
    engine: Engine, request: GenerationRequest, processors: Sequence[OutputProcessor]
) -> AsyncIterator[ChoiceEvent]:
    """Run one sequence per processor (OpenAI's `n`, the prompt computed once by the
    engine) and interleave their events as they come, each with its choice index; every
    choice ends with its `Finished`. A choice that hits a stop string ends alone; closing
    this iterator ends them all. The engine's refusals raise before the first event."""
    if len(processors) == 1:
        async for output in generate_events(engine, request, processors[0]):
            yield 0, output
        return
    streams = engine.generate_choices(request, len(processors))
    sources = [_drive(stream, processor) for stream, processor in zip(streams, processors, strict=True)]
    pending: dict[asyncio.Future[OutputEvent], int] = {
        asyncio.ensure_future(anext(source)): index for index, source in enumerate(sources)
    }
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in sorted(done, key=pending.__getitem__):
                index = pending.pop(future)
                try:
                    output = future.result()
                except StopAsyncIteration:
                    continue
                yield index, output
                pending[asyncio.ensure_future(anext(sources[index]))] = index
    finally:
        for future in pending:
            future.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await future
        for source in sources:
            await source.aclose()
        for stream in streams:  # a source cancelled before it started never closed its stream
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()


async def _drive(
    stream: AsyncIterator[TokenEvent], processor: OutputProcessor
) -> AsyncGenerator[OutputEvent, None]:
    last: TokenEvent | None = None
    reason: str | None = None
    try:
        async for event in stream:
            last = event
            processor.observe(event)
            if event.token_id is not None:
                for output in processor.on_token(event):
                    yield output
                if processor.stopped:
                    reason = "stop"
                    break
            if event.finish_reason is not None:
                reason = event.finish_reason
                break
    finally:
        close = getattr(stream, "aclose", None)
        if close is not None:
            await close()
    if reason is None or last is None:
        raise ApiError(500, "the engine ended the sequence without a finish reason")
    events, final_reason = processor.finish(reason)
    for output in events:
        yield output
    yield Finished(
        final_reason,
        Usage(
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            cached_tokens=last.cached_tokens,
            reasoning_tokens=min(processor.reasoning_tokens, last.completion_tokens),
        ),
        stop_sequence=processor.matched_stop if final_reason == "stop" else None,
    )
