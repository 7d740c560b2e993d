"""The legacy completions endpoint, `POST /v1/completions`, over the shared `Endpoint` base;
the pure work is in completions.py."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from cortex_core.openai.completions import CompletionRequest
from cortex_core.sse import encode_data
from cortex_core.wire import given
from neuron.serving.chat import Prepared
from neuron.serving.completions import CompletionStreamProjector, collect_completion, prepare_completion
from neuron.serving.endpoint import GeneratingEndpoint, Projection, clamp_requested
from neuron.serving.generation import ChoiceEvent
from neuron.serving.model import ServingModel


class CompletionProjection(Projection):
    def __init__(self, body: CompletionRequest, prepared: Prepared) -> None:
        self._model = body.model
        self._logprobs = prepared.logprobs
        options = given(body.stream_options)
        self._projector = CompletionStreamProjector(
            body.model, bool(options and given(options.include_usage)), choices=len(prepared.processors)
        )

    def frames(self, event: ChoiceEvent) -> list[bytes]:
        index, output = event
        return [encode_data(chunk) for chunk in self._projector.project(output, index)]

    def answer(self, events: list[ChoiceEvent]) -> Any:
        return collect_completion(self._model, events, logprobs=self._logprobs)


class Completions(GeneratingEndpoint[CompletionRequest]):
    path = "/v1/completions"
    body_type = CompletionRequest

    def prepare(self, request: Request, body: CompletionRequest, model: ServingModel) -> Prepared:
        return prepare_completion(model, body, clamp=clamp_requested(request))

    def streams(self, body: CompletionRequest) -> bool:
        return bool(given(body.stream))

    def projection(self, body: CompletionRequest, prepared: Prepared) -> Projection:
        return CompletionProjection(body, prepared)
