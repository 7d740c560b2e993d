"""The Responses API endpoint, `POST /v1/responses`, served on the chat path over the
shared `Endpoint` base; the conversion is in responses.py. Its stream has no `[DONE]`, and
a failure mid-stream is a `response.failed` event rather than an error envelope."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from cortex_core.errors import ApiError
from cortex_core.openai.responses import ResponsesRequest
from cortex_core.sse import encode_event
from cortex_core.wire import given
from neuron.serving.chat import Prepared
from neuron.serving.endpoint import GeneratingEndpoint, Projection, clamp_requested
from neuron.serving.generation import ChoiceEvent
from neuron.serving.model import ServingModel
from neuron.serving.responses import ResponsesStreamProjector, collect_response, prepare_responses


class ResponsesProjection(Projection):
    def __init__(self, body: ResponsesRequest) -> None:
        self._body = body
        self._projector = ResponsesStreamProjector(body)

    def head(self) -> list[bytes]:
        return [encode_event(event) for event in self._projector.start()]

    def frames(self, event: ChoiceEvent) -> list[bytes]:
        return [encode_event(e) for e in self._projector.project(event)]

    def tail(self) -> list[bytes]:
        return []

    def error_frame(self, error: ApiError) -> bytes:
        return b"".join(
            encode_event(e) for e in self._projector.fail(error.message, error.code or "server_error")
        )

    def answer(self, events: list[ChoiceEvent]) -> Any:
        return collect_response(self._body, events)


class Responses(GeneratingEndpoint[ResponsesRequest]):
    path = "/v1/responses"
    body_type = ResponsesRequest

    def prepare(self, request: Request, body: ResponsesRequest, model: ServingModel) -> Prepared:
        _, prepared = prepare_responses(model, body, clamp=clamp_requested(request))
        return prepared

    def streams(self, body: ResponsesRequest) -> bool:
        # responses_request_to_chat streams the chat request exactly when this is set.
        return bool(given(body.stream))

    def projection(self, body: ResponsesRequest, prepared: Prepared) -> Projection:
        return ResponsesProjection(body)
