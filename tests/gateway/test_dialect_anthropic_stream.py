"""`/v1/messages` streams: a stall ends them with an Anthropic error event, a client that
hangs up cancels the neuron's work, and a neuron keep-alive reaches the client.

Disconnects need a real connection, so that test serves the gateway app with hypercorn on
loopback and hangs up with an aiohttp client.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
from support.fake_neuron import (
    AsgiNeuronTransport,
    FakeClock,
    gateway,
    gateway_config,
    relaying_neuron,
)
from support.fake_upstream import on_hypercorn
from support.scripted_upstream import Reply, ScriptedNeuron, finish, role, text

from cortex_core.config.catalogue import ModelCatalogue, ModelProfile
from cortex_core.sse import SSEDecoder
from cortex_gateway.app import create_app
from cortex_gateway.dialects.anthropic import AnthropicSSETranslator
from cortex_gateway.neuron_client import NeuronClient

MODEL = "org/chat"
CATALOGUE = ModelCatalogue([ModelProfile(id=MODEL)], {})
REQUEST = {"model": MODEL, "max_tokens": 64, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
LABELS = {"model": MODEL, "node": "a"}
# A liveness bound for things that should happen at once; never a speed assertion.
PATIENCE_SECS = 10.0


def event_types(body: bytes) -> list[str]:
    decoder = SSEDecoder()
    return [json.loads(m.data)["type"] for m in decoder.feed(body) + decoder.close()]


async def test_stalled_stream_ends_with_an_anthropic_error_event() -> None:
    reply = Reply([role(), text("a"), text("b"), finish("stop")], stall=(2, 5.0))
    async with (
        ScriptedNeuron(reply) as upstream,
        gateway([relaying_neuron(upstream.base_url, MODEL)], CATALOGUE, proxy={"idle_timeout_secs": 0.3}) as (
            app,
            http,
        ),
    ):
        response = await http.post("/v1/messages", json=REQUEST)
        await asyncio.wait_for(upstream.gone.wait(), PATIENCE_SECS)
    assert response.status_code == 200
    assert event_types(response.content) == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "error",
    ]
    assert b"no data from node for 0.3 s" in response.content
    registry = app.state.metrics.registry
    assert registry.get_sample_value("cortex_request_errors_total", LABELS) == 1.0


async def test_client_disconnect_mid_stream_cancels_the_neuron() -> None:
    reply = Reply([role(), *(text(f"t{i}") for i in range(200)), finish("stop")], delay=0.05)
    async with ScriptedNeuron(reply) as upstream:
        client = NeuronClient(
            AsgiNeuronTransport([relaying_neuron(upstream.base_url, MODEL)]), poll_timeout=2.0
        )
        config = gateway_config([relaying_neuron(upstream.base_url, MODEL)])
        app = create_app(config, CATALOGUE, neuron_client=client, clock=FakeClock(), run_poller=False)
        async with on_hypercorn(app) as base_url, aiohttp.ClientSession() as session:
            await app.state.poller.poll_once()
            response = await session.post(base_url + "/v1/messages", json=REQUEST)
            assert response.status == 200
            first = await response.content.readany()
            assert first.startswith(b"event: message_start")
            response.close()  # hang up mid-stream
            await asyncio.wait_for(upstream.gone.wait(), PATIENCE_SECS)
            registry = app.state.metrics.registry
            for _ in range(100):  # the gateway finishes its bookkeeping just after the upstream goes
                if registry.get_sample_value("cortex_responses_total", {**LABELS, "status": "499"}):
                    break
                await asyncio.sleep(0.02)
    assert registry.get_sample_value("cortex_responses_total", {**LABELS, "status": "499"}) == 1.0
    assert registry.get_sample_value("cortex_requests_in_flight", LABELS) == 0.0


def test_keepalive_comment_passes_through_and_frames_may_split_anywhere() -> None:
    translator = AnthropicSSETranslator()
    assert translator.feed(b": keep-alive\n\n") == b": keep-alive\n\n"
    frame = b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'
    out = b"".join(translator.feed(frame[i : i + 7]) for i in range(0, len(frame), 7))
    out += translator.feed(b"data: [DONE]\n\n") + translator.close()
    assert event_types(out) == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


def test_stream_without_done_is_still_closed() -> None:
    translator = AnthropicSSETranslator()
    out = translator.feed(b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"Hi"}}]}')
    out += translator.close()  # the last frame had no blank line either
    assert event_types(out)[-2:] == ["message_delta", "message_stop"]
    assert b'"text":"Hi"' in out
