"""A bug in a handler is still a JSON answer in the caller's dialect, never a plain-text 500."""

from __future__ import annotations

import httpx2
import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cortex_core.config.catalogue import ModelCatalogue
from cortex_core.config.gateway import GatewayConfig
from cortex_core.config.neuron import NeuronConfig
from cortex_gateway.app import create_app
from neuron.app import create_app as create_neuron
from neuron.discovery import HostProbe


async def broken(request: Request) -> Response:
    raise RecursionError("maximum recursion depth exceeded")


def client(app: object) -> httpx2.AsyncClient:
    # The exception is re-raised after the answer (so the server logs it); the client only
    # looks at the answer.
    transport = httpx2.ASGITransport(app=app, raise_app_exceptions=False)  # type: ignore[arg-type]
    return httpx2.AsyncClient(transport=transport, base_url="http://test")


@pytest.mark.parametrize("anthropic", [False, True])
async def test_the_gateway_answers_a_bug_in_the_dialect(anthropic: bool) -> None:
    app = create_app(
        GatewayConfig(), ModelCatalogue([], {}), run_poller=False, extra_routes=[Route("/v1/broken", broken)]
    )
    headers = {"anthropic-version": "2023-06-01"} if anthropic else {}
    async with client(app) as http:
        response = await http.get("/v1/broken", headers=headers)
    assert response.status_code == 500
    body = response.json()
    if anthropic:
        assert body["type"] == "error" and body["error"]["type"] == "api_error"
        assert "RecursionError" in body["error"]["message"]
    else:
        assert body["error"]["code"] == "internal_error"
        assert "RecursionError" in body["error"]["message"]


async def test_the_neuron_answers_a_bug_in_its_envelope() -> None:
    app = create_neuron(
        NeuronConfig(),
        probe=HostProbe(None, cuda_unavailable_reason="test host: CPU only"),
        serving_routes=lambda lookup, config: [Route("/v1/broken", broken)],
        activate_defaults=False,
    )
    async with client(app) as http:
        response = await http.get("/v1/broken")
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
