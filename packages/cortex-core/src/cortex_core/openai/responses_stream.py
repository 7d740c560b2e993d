"""OpenAI chat chunks → Responses API stream events: an explicit state machine.

Feed it every chat chunk the engine produces, then `finish()` or `fail()`; each call returns
the events to send (`cortex_core.sse.encode_event` frames them). Every event carries a
`sequence_number` counting from 0. The sequence:

    response.created · response.in_progress ·
    per reasoning run: output_item.added(reasoning) · content_part.added(reasoning_text) ·
        reasoning_text.delta… · reasoning_text.done · content_part.done · output_item.done
    per text run: output_item.added(message) · content_part.added(output_text) ·
        output_text.delta… · output_text.done · content_part.done · output_item.done
    per tool call: output_item.added(function_call) · function_call_arguments.delta… ·
        function_call_arguments.done · output_item.done
    response.completed (or response.incomplete when the token limit was hit)

A switch of kind closes the open item, and `output_index` counts items in opening order.
Calls of one run stay open together (their deltas are addressed by item id) and close when
the run ends. A reply with no text and no calls still gets an (empty) message item.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cortex_core.openai.chat import ChatCompletionChunk, ChoiceDeltaToolCall, CompletionUsage
from cortex_core.openai.responses import (
    ItemStatus,
    ReasoningText,
    Response,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseError,
    ResponseFailedEvent,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseFunctionToolCall,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseOutputItem,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseReasoningItem,
    ResponseReasoningTextDeltaEvent,
    ResponseReasoningTextDoneEvent,
    ResponsesRequest,
    ResponseStreamEvent,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
)
from cortex_core.openai.responses_convert import finish_status, item_ids, response_shell, response_usage
from cortex_core.wire import given

TextKind = Literal["reasoning", "message"]


@dataclass(slots=True)
class _OpenText:
    kind: TextKind
    item_id: str
    output_index: int
    pieces: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _OpenCall:
    item_id: str
    output_index: int
    call_id: str
    name: str
    pieces: list[str] = field(default_factory=list)


@dataclass(slots=True)
class ResponsesStreamConverter:
    """One per streamed `/v1/responses` reply. Ids and time come from the caller (the edge)."""

    request: ResponsesRequest
    response_id: str
    created_at: int
    _sequence: int = 0
    _started: bool = False
    _finished: bool = False
    _output: list[ResponseOutputItem] = field(default_factory=list)
    _next_output_index: int = 0
    _text: _OpenText | None = None
    _calls: dict[int, _OpenCall] = field(default_factory=dict)
    _items_of_kind: dict[str, int] = field(default_factory=dict)
    _finish_reason: str | None = None
    _usage: CompletionUsage | None = None

    @property
    def finished(self) -> bool:
        return self._finished

    def start(self) -> list[ResponseStreamEvent]:
        """`response.created` and `response.in_progress`; `feed` calls it if nobody did."""
        if self._started:
            return []
        self._started = True
        return [
            ResponseCreatedEvent(sequence_number=self._next(), response=self._shell()),
            ResponseInProgressEvent(sequence_number=self._next(), response=self._shell()),
        ]

    def feed(self, chunk: ChatCompletionChunk) -> list[ResponseStreamEvent]:
        if self._finished:
            return []
        events = self.start()
        usage = given(chunk.usage)
        if usage is not None:
            self._usage = usage
        for choice in chunk.choices:
            if choice.index != 0:
                continue
            delta = choice.delta
            reasoning = given(delta.reasoning_content) or given(delta.reasoning)
            if reasoning:
                events += self._append_text("reasoning", reasoning)
            content = given(delta.content)
            if content:
                events += self._append_text("message", content)
            for call in given(delta.tool_calls) or []:
                events += self._append_call(call)
            if choice.finish_reason is not None:
                self._finish_reason = choice.finish_reason
        return events

    def finish(self) -> list[ResponseStreamEvent]:
        """Close every open item and the response. Idempotent."""
        if self._finished:
            return []
        events = self.start()
        status, incomplete = finish_status(self._finish_reason)
        item_status: ItemStatus = "completed" if status == "completed" else "incomplete"
        events += self._close_text(item_status) + self._close_calls()
        if not self._output:
            events += self._append_text("message", "") + self._close_text(item_status)
        self._finished = True
        response = self._shell()
        response.status = status
        response.incomplete_details = incomplete
        response.output = list(self._output)
        response.usage = response_usage(self._usage)
        if status == "completed":
            events.append(ResponseCompletedEvent(sequence_number=self._next(), response=response))
        else:
            events.append(ResponseIncompleteEvent(sequence_number=self._next(), response=response))
        return events

    def fail(self, message: str, *, code: str = "server_error") -> list[ResponseStreamEvent]:
        """The engine or upstream failed mid-stream: `response.failed` ends the stream."""
        if self._finished:
            return []
        events = self.start()
        self._finished = True
        response = self._shell()
        response.status = "failed"
        response.error = ResponseError(code=code, message=message)
        response.output = list(self._output)
        response.usage = response_usage(self._usage)
        events.append(ResponseFailedEvent(sequence_number=self._next(), response=response))
        return events

    # --- internals -----------------------------------------------------------------------

    def _next(self) -> int:
        number = self._sequence
        self._sequence += 1
        return number

    def _shell(self) -> Response:
        return response_shell(self.request, response_id=self.response_id, created_at=self.created_at)

    def _item_id(self, kind: str) -> str:
        reasoning_id, message_id, call_prefix = item_ids(self.response_id)
        base = {"reasoning": reasoning_id, "message": message_id, "function_call": call_prefix}[kind]
        count = self._items_of_kind.get(kind, 0)
        self._items_of_kind[kind] = count + 1
        if kind == "function_call":
            return f"{base}_{count}"
        return base if count == 0 else f"{base}_{count}"

    def _take_output_index(self) -> int:
        index = self._next_output_index
        self._next_output_index += 1
        return index

    def _append_text(self, kind: TextKind, text: str) -> list[ResponseStreamEvent]:
        events = self._close_calls()
        if self._text is not None and self._text.kind != kind:
            events += self._close_text("completed")
        if self._text is None:
            self._text = _OpenText(
                kind=kind, item_id=self._item_id(kind), output_index=self._take_output_index()
            )
            events += self._open_text_events(self._text)
        open_text = self._text
        if text:
            open_text.pieces.append(text)
            delta_type = ResponseReasoningTextDeltaEvent if kind == "reasoning" else ResponseTextDeltaEvent
            events.append(
                delta_type(
                    sequence_number=self._next(),
                    item_id=open_text.item_id,
                    output_index=open_text.output_index,
                    content_index=0,
                    delta=text,
                )
            )
        return events

    def _open_text_events(self, open_text: _OpenText) -> list[ResponseStreamEvent]:
        item: ResponseOutputItem
        part: ReasoningText | ResponseOutputText
        if open_text.kind == "reasoning":
            item = ResponseReasoningItem(id=open_text.item_id, content=[])
            part = ReasoningText(text="")
        else:
            item = ResponseOutputMessage(id=open_text.item_id)
            part = ResponseOutputText(text="")
        return [
            ResponseOutputItemAddedEvent(
                sequence_number=self._next(), output_index=open_text.output_index, item=item
            ),
            ResponseContentPartAddedEvent(
                sequence_number=self._next(),
                item_id=open_text.item_id,
                output_index=open_text.output_index,
                content_index=0,
                part=part,
            ),
        ]

    def _close_text(self, status: ItemStatus) -> list[ResponseStreamEvent]:
        open_text = self._text
        if open_text is None:
            return []
        self._text = None
        text = "".join(open_text.pieces)
        item_id, output_index = open_text.item_id, open_text.output_index
        item: ResponseOutputItem
        part: ReasoningText | ResponseOutputText
        done: ResponseStreamEvent
        if open_text.kind == "reasoning":
            part = ReasoningText(text=text)
            done = ResponseReasoningTextDoneEvent(
                sequence_number=self._next(),
                item_id=item_id,
                output_index=output_index,
                content_index=0,
                text=text,
            )
            item = ResponseReasoningItem(id=item_id, content=[part], status="completed")
        else:
            part = ResponseOutputText(text=text)
            done = ResponseTextDoneEvent(
                sequence_number=self._next(),
                item_id=item_id,
                output_index=output_index,
                content_index=0,
                text=text,
            )
            item = ResponseOutputMessage(id=item_id, status=status, content=[part])
        events: list[ResponseStreamEvent] = [
            done,
            ResponseContentPartDoneEvent(
                sequence_number=self._next(),
                item_id=item_id,
                output_index=output_index,
                content_index=0,
                part=part,
            ),
        ]
        events.append(
            ResponseOutputItemDoneEvent(
                sequence_number=self._next(), output_index=open_text.output_index, item=item
            )
        )
        self._output.append(item)
        return events

    def _append_call(self, delta: ChoiceDeltaToolCall) -> list[ResponseStreamEvent]:
        events = self._close_text("completed")
        function = given(delta.function)
        call = self._calls.get(delta.index)
        if call is None:
            call = self._calls[delta.index] = _OpenCall(
                item_id=self._item_id("function_call"),
                output_index=self._take_output_index(),
                call_id=given(delta.id) or f"call_{delta.index}",
                name=(given(function.name) if function else None) or "",
            )
            item = ResponseFunctionToolCall(id=call.item_id, call_id=call.call_id, name=call.name)
            events.append(
                ResponseOutputItemAddedEvent(
                    sequence_number=self._next(), output_index=call.output_index, item=item
                )
            )
        elif function is not None and isinstance(function.name, str) and function.name:
            call.name = function.name
        arguments = given(function.arguments) if function else None
        if arguments:
            call.pieces.append(arguments)
            events.append(
                ResponseFunctionCallArgumentsDeltaEvent(
                    sequence_number=self._next(),
                    item_id=call.item_id,
                    output_index=call.output_index,
                    delta=arguments,
                )
            )
        return events

    def _close_calls(self) -> list[ResponseStreamEvent]:
        events: list[ResponseStreamEvent] = []
        for _, call in sorted(self._calls.items(), key=lambda entry: entry[1].output_index):
            arguments = "".join(call.pieces)
            events.append(
                ResponseFunctionCallArgumentsDoneEvent(
                    sequence_number=self._next(),
                    item_id=call.item_id,
                    output_index=call.output_index,
                    arguments=arguments,
                )
            )
            item = ResponseFunctionToolCall(
                id=call.item_id, call_id=call.call_id, name=call.name, arguments=arguments, status="completed"
            )
            events.append(
                ResponseOutputItemDoneEvent(
                    sequence_number=self._next(), output_index=call.output_index, item=item
                )
            )
            self._output.append(item)
        self._calls.clear()
        return events
