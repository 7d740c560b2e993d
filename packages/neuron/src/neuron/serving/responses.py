"""`POST /v1/responses`, served on the chat path.

The request becomes a chat request (cortex_core's `responses_request_to_chat`); output events
become chat chunks, which `ResponsesStreamConverter` turns into the Responses event
sequence (created, in_progress, reasoning / message / function_call items, completed or
incomplete). Reasoning always goes to reasoning items here — the `x-include-thinking`
header is a chat-completions opt-in — and `enable_thinking` is left to the template unless
`reasoning.effort` is given.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from cortex_core.openai.chat import ChatCompletionRequest
from cortex_core.openai.responses import Response, ResponsesRequest, ResponseStreamEvent
from cortex_core.openai.responses_convert import response_from_chat_completion, responses_request_to_chat
from cortex_core.openai.responses_stream import ResponsesStreamConverter
from cortex_core.wire import given
from neuron.serving.chat import (
    ChatStreamProjector,
    Prepared,
    collect_chat_completion,
    enable_thinking_default,
    prepare_chat,
)
from neuron.serving.generation import ChoiceEvent, Finished
from neuron.serving.model import ServingModel
from neuron.serving.params import invalid


def new_response_id() -> str:
    return f"resp_{secrets.token_hex(12)}"


# The chat fields a refusal may name, as the Responses client sent them.
RESPONSES_FIELDS: Mapping[str, str] = MappingProxyType(
    {"response_format": "text.format", "messages": "input"}
)


def prepare_responses(
    model: ServingModel, request: ResponsesRequest, *, clamp: bool = False
) -> tuple[ChatCompletionRequest, Prepared]:
    chat = responses_request_to_chat(request)
    if given(chat.top_logprobs):
        # The chat path computes them, but the Responses items do not carry them yet.
        raise invalid(
            "top_logprobs is not supported on /v1/responses; use /v1/chat/completions",
            "top_logprobs",
            code="unsupported_parameter",
        )
    thinking = enable_thinking_default(chat, None)
    return chat, prepare_chat(
        model, chat, thinking=False, enable_thinking=thinking, field_names=RESPONSES_FIELDS, clamp=clamp
    )


@dataclass
class ResponsesStreamProjector:
    request: ResponsesRequest
    response_id: str = field(default_factory=new_response_id)
    created_at: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self._chunks = ChatStreamProjector(self.request.model, include_usage=True)
        self._converter = ResponsesStreamConverter(
            request=self.request, response_id=self.response_id, created_at=self.created_at
        )

    def start(self) -> list[ResponseStreamEvent]:
        return self._converter.start()

    def project(self, item: ChoiceEvent) -> list[ResponseStreamEvent]:
        _, event = item  # one choice: Responses has no `n`
        events: list[ResponseStreamEvent] = []
        for chunk in self._chunks.project(event):
            events += self._converter.feed(chunk)
        if isinstance(event, Finished):
            events += self._converter.finish()
        return events

    def fail(self, message: str, code: str) -> list[ResponseStreamEvent]:
        return self._converter.fail(message, code=code)


def collect_response(request: ResponsesRequest, events: Iterable[ChoiceEvent]) -> Response:
    completion = collect_chat_completion(request.model, events)
    return response_from_chat_completion(
        completion, request, response_id=new_response_id(), created_at=int(time.time())
    )
