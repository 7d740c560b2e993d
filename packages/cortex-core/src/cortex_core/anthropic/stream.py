"""OpenAI chat chunks → Anthropic Messages stream events: an explicit state machine.

Feed it every parsed upstream chunk, then `finish()` at `[DONE]` or end of stream, or `fail()`
when the upstream breaks. Each call returns the events to send, in order
(`cortex_core.sse.encode_event` frames them). The sequence it produces:

    message_start (once) · ping · per run of one kind: content_block_start ·
    content_block_delta… · content_block_stop · message_delta (stop_reason, usage) · message_stop

Runs: reasoning (`reasoning_content` or `reasoning`) opens a `thinking` block, text a `text`
block, and a switch of kind closes the open block first, so reasoning never leaks into text
(the LiteLLM bug in peers.md §3.1).

Tool calls are buffered per OpenAI `index` while their run lasts and emitted when it ends
(text or reasoning arrives, or the stream finishes): one `tool_use` block per call with its
whole arguments in one `input_json_delta`. Buffering costs nothing visible (a local model's
arguments arrive within one parse) and guarantees that deltas arriving interleaved or late
are never dropped, and that the JSON a client's SDK parses is a valid object (arguments that
are not become `{"_raw": ...}`, as in the non-streaming converter).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import msgspec

from cortex_core.anthropic.convert import (
    anthropic_message_id,
    anthropic_stop_reason,
    anthropic_usage,
    reasoning_text,
    tool_input,
)
from cortex_core.anthropic.messages import (
    ContentBlockDeltaEvent,
    ContentBlockStartEvent,
    ContentBlockStopEvent,
    ErrorDetail,
    ErrorEvent,
    InputJSONDelta,
    Message,
    MessageDelta,
    MessageDeltaEvent,
    MessageDeltaUsage,
    MessageStartEvent,
    MessageStopEvent,
    MessageStreamEvent,
    PingEvent,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    ToolUseBlock,
)
from cortex_core.openai.chat import ChatCompletionChunk, ChoiceDeltaToolCall, CompletionUsage
from cortex_core.wire import UNSET, Maybe, given

BlockKind = Literal["text", "thinking"]


@dataclass(slots=True)
class _ToolCallBuffer:
    id: str
    name: str
    arguments: list[str] = field(default_factory=list)


@dataclass(slots=True)
class AnthropicStreamConverter:
    """One per streamed `/v1/messages` response.

    `model` overrides the upstream's model name in `message_start`; `message_id` the id
    derived from the upstream chunk id.
    """

    model: str | None = None
    message_id: str | None = None
    _started: bool = False
    _finished: bool = False
    _next_index: int = 0
    _open: tuple[BlockKind, int] | None = None
    _tools: dict[int, _ToolCallBuffer] = field(default_factory=dict)
    _used_tools: bool = False
    _finish_reason: str | None = None
    _matched_stop: Maybe[str | int] = UNSET
    _usage: CompletionUsage | None = None
    _deltas: int = 0

    @property
    def finished(self) -> bool:
        return self._finished

    def feed(self, chunk: ChatCompletionChunk) -> list[MessageStreamEvent]:
        if self._finished:
            return []
        events: list[MessageStreamEvent] = []
        usage = given(chunk.usage)
        if usage is not None:
            self._usage = usage
        if not self._started:
            events += self._start(chunk.id, chunk.model)
        for choice in chunk.choices:
            if choice.index != 0:
                continue  # Anthropic has no `n`; only the first choice is a message
            delta = choice.delta
            reasoning = reasoning_text(delta.reasoning_content, delta.reasoning)
            if reasoning:
                events += self._append("thinking", reasoning)
            content = given(delta.content)
            if content:
                events += self._append("text", content)
            for call in given(delta.tool_calls) or []:
                events += self._buffer_tool_call(call)
            if choice.finish_reason is not None:
                self._finish_reason = choice.finish_reason
                self._matched_stop = choice.stop_reason
        return events

    def finish(self) -> list[MessageStreamEvent]:
        """Close the message (upstream `[DONE]` or end of stream). Idempotent."""
        if self._finished:
            return []
        events = self._start("", "") if not self._started else []
        events += self._flush_tools()
        events += self._close_open_block()
        self._finished = True
        stop_reason, stop_sequence = anthropic_stop_reason(
            self._finish_reason, self._matched_stop, used_tools=self._used_tools
        )
        events.append(
            MessageDeltaEvent(
                delta=MessageDelta(stop_reason=stop_reason, stop_sequence=stop_sequence),
                usage=self._delta_usage(),
            )
        )
        events.append(MessageStopEvent())
        return events

    def fail(self, message: str, *, error_type: str = "api_error") -> list[MessageStreamEvent]:
        """An upstream failure mid-stream: Anthropic's `error` event ends the stream."""
        if self._finished:
            return []
        self._finished = True
        return [ErrorEvent(error=ErrorDetail(type=error_type, message=message))]

    # --- internals -----------------------------------------------------------------------

    def _start(self, upstream_id: str, upstream_model: str) -> list[MessageStreamEvent]:
        self._started = True
        usage = anthropic_usage(self._usage)
        # Output so far is nothing, whatever an early usage object says.
        usage.output_tokens = 0
        message = Message(
            id=self.message_id or anthropic_message_id(upstream_id),
            model=self.model or upstream_model,
            usage=usage,
        )
        return [MessageStartEvent(message=message), PingEvent()]

    def _append(self, kind: BlockKind, text: str) -> list[MessageStreamEvent]:
        events = self._flush_tools()
        if self._open is not None and self._open[0] != kind:
            events += self._close_open_block()
        if self._open is None:
            index = self._take_index()
            block = TextBlock(text="") if kind == "text" else ThinkingBlock(thinking="")
            events.append(ContentBlockStartEvent(index=index, content_block=block))
            self._open = (kind, index)
        index = self._open[1]
        delta = TextDelta(text=text) if kind == "text" else ThinkingDelta(thinking=text)
        events.append(ContentBlockDeltaEvent(index=index, delta=delta))
        self._deltas += 1
        return events

    def _buffer_tool_call(self, call: ChoiceDeltaToolCall) -> list[MessageStreamEvent]:
        events = self._close_open_block()
        function = given(call.function)
        buffer = self._tools.get(call.index)
        if buffer is None:
            buffer = self._tools[call.index] = _ToolCallBuffer(id=f"toolu_{call.index}", name="")
        call_id = given(call.id)
        if call_id:
            buffer.id = call_id
        if function is not None:
            name = given(function.name)
            if name:
                buffer.name = name
            arguments = given(function.arguments)
            if arguments:
                buffer.arguments.append(arguments)
                self._deltas += 1
        return events

    def _flush_tools(self) -> list[MessageStreamEvent]:
        events: list[MessageStreamEvent] = []
        for _, call in sorted(self._tools.items()):
            index = self._take_index()
            arguments = "".join(call.arguments)
            events.append(
                ContentBlockStartEvent(index=index, content_block=ToolUseBlock(id=call.id, name=call.name))
            )
            events.append(
                ContentBlockDeltaEvent(
                    index=index,
                    delta=InputJSONDelta(partial_json=msgspec.json.encode(tool_input(arguments)).decode()),
                )
            )
            events.append(ContentBlockStopEvent(index=index))
            self._used_tools = True
        self._tools.clear()
        return events

    def _close_open_block(self) -> list[MessageStreamEvent]:
        if self._open is None:
            return []
        index = self._open[1]
        self._open = None
        return [ContentBlockStopEvent(index=index)]

    def _take_index(self) -> int:
        index = self._next_index
        self._next_index += 1
        return index

    def _delta_usage(self) -> MessageDeltaUsage:
        if self._usage is None:
            # No usage from upstream: one delta is close to one token for a local model.
            return MessageDeltaUsage(output_tokens=self._deltas)
        usage = anthropic_usage(self._usage)
        return MessageDeltaUsage(
            output_tokens=usage.output_tokens,
            input_tokens=usage.input_tokens,
            cache_read_input_tokens=usage.cache_read_input_tokens or 0,
            cache_creation_input_tokens=0,
        )
