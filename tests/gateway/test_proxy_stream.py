"""Streams end when they stall, not when they are long; a client that leaves cancels the upstream.

Disconnects need a real connection, so those tests serve the relay app with hypercorn on
loopback and use an aiohttp client that hangs up.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
from support.fake_upstream import FakeUpstream, Script, in_process, on_hypercorn, relay_app, sse_stream
from support.fixed_router import FixedRouter

from cortex_core.config.gateway import ProxySection
from cortex_gateway.lease import Upstream

REQUEST = b'{"model":"qwen","stream":true,"messages":[{"role":"user","content":"hi"}]}'
# A liveness bound for events that should happen at once; never a speed assertion.
PATIENCE_SECS = 10.0


def router(upstream: FakeUpstream) -> FixedRouter:
    return FixedRouter({"qwen": [Upstream("node0", upstream.base_url, "qwen")]})


async def test_stalled_stream_is_ended_with_an_error_event() -> None:
    chunks = sse_stream(["a", "b", "c"])
    script = Script(content_type="text/event-stream", chunks=chunks, stall=(2, 5.0))
    config = ProxySection(idle_timeout_secs=0.5)
    async with FakeUpstream(script) as upstream:
        app = relay_app(router(upstream), config)
        async with in_process(app) as client:
            response = await client.post("/v1/chat/completions", content=REQUEST)
        await asyncio.wait_for(upstream.gone.wait(), PATIENCE_SECS)
    assert response.content.startswith(chunks[0] + chunks[1])
    assert b"upstream_stream_error" in response.content
    assert b"no data from node for 0.5 s" in response.content
    assert b"[DONE]" not in response.content
    assert len(upstream.calls) == 1
    labels = {"model": "qwen", "node": "node0"}
    assert app.state.metrics.registry.get_sample_value("cortex_request_errors_total", labels) == 1.0


async def test_long_steady_stream_outlives_the_idle_timeout() -> None:
    # 16 chunks 0.1 s apart: 1.6 s in all, three times the idle timeout, never idle near it.
    chunks = sse_stream([f"t{i}" for i in range(12)])
    script = Script(content_type="text/event-stream", chunks=chunks, delay=0.1)
    config = ProxySection(idle_timeout_secs=0.5)
    async with (
        FakeUpstream(script) as upstream,
        in_process(relay_app(router(upstream), config)) as client,
    ):
        response = await client.post("/v1/chat/completions", content=REQUEST)
    assert response.content == b"".join(chunks)
    assert upstream.finished == 1


async def test_client_disconnect_mid_stream_cancels_upstream() -> None:
    chunks = sse_stream([f"t{i}" for i in range(200)])
    script = Script(content_type="text/event-stream", chunks=chunks, delay=0.05)
    async with FakeUpstream(script) as upstream:
        app = relay_app(router(upstream))
        async with on_hypercorn(app) as base_url, aiohttp.ClientSession() as session:
            response = await session.post(base_url + "/v1/chat/completions", data=REQUEST)
            first = await response.content.readany()
            assert first.startswith(b"data: ")
            response.close()  # hang up mid-stream
            await asyncio.wait_for(upstream.gone.wait(), PATIENCE_SECS)
            await _settled(app)
    assert upstream.finished == 0
    labels = {"model": "qwen", "node": "node0"}
    registry = app.state.metrics.registry
    assert registry.get_sample_value("cortex_responses_total", {**labels, "status": "499"}) == 1.0
    assert registry.get_sample_value("cortex_requests_in_flight", labels) == 0.0


async def test_client_disconnect_while_waiting_for_headers_cancels_upstream() -> None:
    # A non-streamed generation: nothing comes back until it is done.
    async with FakeUpstream(Script(before_headers=60.0)) as upstream:
        fleet = router(upstream)
        app = relay_app(fleet)
        async with on_hypercorn(app) as base_url, aiohttp.ClientSession() as session:
            waiting = asyncio.ensure_future(session.post(base_url + "/v1/chat/completions", data=REQUEST))
            await asyncio.wait_for(upstream.called.wait(), PATIENCE_SECS)  # the neuron is generating
            waiting.cancel()  # the client gives up and hangs up
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
            await asyncio.wait_for(upstream.gone.wait(), PATIENCE_SECS)
            await _settled(app)
    assert all(count == 0 for count in fleet.in_flight.values())


async def test_json_body_cut_mid_way_aborts_the_client_connection() -> None:
    script = Script(chunks=[b'{"id":"x",', b'"choices":[]', b"}"], delay=0.02, die_after=2)
    async with FakeUpstream(script) as upstream:
        app = relay_app(router(upstream))
        async with on_hypercorn(app) as base_url, aiohttp.ClientSession() as session:
            response = await session.post(base_url + "/v1/chat/completions", data=REQUEST)
            assert response.status == 200
            try:
                body = await response.read()
            except aiohttp.ClientPayloadError:
                body = None
    assert body is None, f"a truncated body was delivered as complete: {body!r}"
    assert len(upstream.calls) == 1


async def _settled(app: object) -> None:
    """Wait until the relay has finished its bookkeeping (in-flight back to zero)."""
    registry = app.state.metrics.registry  # type: ignore[attr-defined]
    labels = {"model": "qwen", "node": "node0"}
    for _ in range(int(PATIENCE_SECS / 0.01)):
        if registry.get_sample_value("cortex_requests_in_flight", labels) == 0.0:
            return
        await asyncio.sleep(0.01)


async def test_chunks_reach_the_client_before_the_stream_ends() -> None:
    # The upstream holds its second token until the client has seen the first: a proxy that
    # buffered would never deliver it, and the test would time out.
    gate = asyncio.Event()
    chunks = sse_stream(["first", "second"])
    script = Script(content_type="text/event-stream", chunks=chunks, gate=(2, gate))
    async with FakeUpstream(script) as upstream:
        app = relay_app(router(upstream))
        async with on_hypercorn(app) as base_url, aiohttp.ClientSession() as session:
            response = await session.post(base_url + "/v1/chat/completions", data=REQUEST)
            seen = b""
            while b'"first"' not in seen:
                seen += await asyncio.wait_for(response.content.readany(), PATIENCE_SECS)
            gate.set()
            seen += await response.content.read()
    assert seen == b"".join(chunks)
