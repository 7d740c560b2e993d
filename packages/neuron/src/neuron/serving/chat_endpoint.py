"""The chat dialect's endpoints: `POST /v1/chat/completions` and `POST /v1/chat/count_tokens`.

The pure work (prompt, parameters, projections) is in chat.py; these classes only say how
a chat request flows through the shared `Endpoint` base.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from cortex_core.http import INCLUDE_THINKING_HEADER, header_flag, json_response
from cortex_core.openai.chat import ChatCompletionRequest
from cortex_core.sse import encode_data
from cortex_core.wire import given
from neuron.serving.chat import (
    ChatStreamProjector,
    Prepared,
    chat_prompt_ids,
    collect_chat_completion,
    enable_thinking_default,
    prepare_chat,
    require_messages,
)
from neuron.serving.endpoint import Endpoint, GeneratingEndpoint, Projection, clamp_requested
from neuron.serving.generation import ChoiceEvent
from neuron.serving.model import ServingModel


def thinking_choice(request: Request, body: ChatCompletionRequest) -> tuple[bool, bool | None]:
    """(reasoning back inside `content`, the template's `enable_thinking`). Hidden reasoning
    used to eat the whole budget and return empty answers, so thinking is on only when the
    client asks for it, either way (neuron.md §13.8)."""
    inline = header_flag(request.headers.get(INCLUDE_THINKING_HEADER))
    return inline, enable_thinking_default(body, inline)


class ChatProjection(Projection):
    def __init__(self, body: ChatCompletionRequest, prepared: Prepared) -> None:
        self._model = body.model
        self._logprobs = prepared.logprobs
        options = given(body.stream_options)
        continuous = bool(options and given(options.continuous_usage_stats))
        self._projector = ChatStreamProjector(
            body.model,
            bool(options and given(options.include_usage)),
            usage_now=prepared.usage_now if continuous else None,
            choices=len(prepared.processors),
        )

    def head(self) -> list[bytes]:
        return [encode_data(chunk) for chunk in self._projector.start()]

    def frames(self, event: ChoiceEvent) -> list[bytes]:
        index, output = event
        return [encode_data(chunk) for chunk in self._projector.project(output, index)]

    def answer(self, events: list[ChoiceEvent]) -> Any:
        return collect_chat_completion(self._model, events, logprobs=self._logprobs)


class ChatCompletions(GeneratingEndpoint[ChatCompletionRequest]):
    path = "/v1/chat/completions"
    body_type = ChatCompletionRequest

    def prepare(self, request: Request, body: ChatCompletionRequest, model: ServingModel) -> Prepared:
        inline, enable = thinking_choice(request, body)
        return prepare_chat(
            model, body, thinking=inline, enable_thinking=enable, clamp=clamp_requested(request)
        )

    def streams(self, body: ChatCompletionRequest) -> bool:
        return bool(given(body.stream))

    def projection(self, body: ChatCompletionRequest, prepared: Prepared) -> Projection:
        return ChatProjection(body, prepared)


class ChatCountTokens(Endpoint[ChatCompletionRequest]):
    """The prompt's length as the model would see it: what the gateway's Anthropic
    `count_tokens` asks a replica for."""

    path = "/v1/chat/count_tokens"
    body_type = ChatCompletionRequest

    async def respond(self, request: Request, body: ChatCompletionRequest, model: ServingModel) -> Response:
        _, enable = thinking_choice(request, body)

        def count() -> int:
            require_messages(body)
            # A vision model's images count as the tokens they become.
            return len(chat_prompt_ids(model, body, enable_thinking=enable)[1])

        return json_response({"input_tokens": await asyncio.to_thread(count)})
