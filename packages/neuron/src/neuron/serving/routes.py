"""The inference routes: one small endpoint class per route (endpoint.py has the shared flow).

A new dialect on the neuron is a module with its endpoint classes, added to the list here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.routing import Route

from neuron.loaded_model import LoadedModel
from neuron.serving.chat_endpoint import ChatCompletions, ChatCountTokens
from neuron.serving.completions_endpoint import Completions
from neuron.serving.endpoint import Endpoint
from neuron.serving.model import ServingModels
from neuron.serving.responses_endpoint import Responses


def inference_routes(lookup: Callable[[str], LoadedModel], *, keepalive_secs: float = 5.0) -> list[Route]:
    """Routes for /v1/chat/completions, /v1/completions, /v1/responses, /v1/chat/count_tokens.

    `lookup(model_id)` returns the loaded model or raises ApiError(404, model_not_found).
    """
    models = ServingModels(lookup)
    endpoints: list[Endpoint[Any]] = [
        ChatCompletions(models, keepalive_secs=keepalive_secs),
        Completions(models, keepalive_secs=keepalive_secs),
        Responses(models, keepalive_secs=keepalive_secs),
        ChatCountTokens(models, keepalive_secs=keepalive_secs),
    ]
    # A bound method, so Starlette wraps it as a request handler (an instance would be taken
    # for a raw ASGI app).
    return [Route(endpoint.path, endpoint.handle, methods=["POST"]) for endpoint in endpoints]
