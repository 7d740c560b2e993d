"""Failover happens only before the first byte reached the client; unreachable is 503/502 in OpenAI shape."""

from __future__ import annotations

import asyncio
import socket

import httpx2
import pytest
from support.fake_upstream import CHAT_JSON, FakeUpstream, Script, in_process, relay_app, sse_stream
from support.fixed_router import FixedRouter

from cortex_core.config.gateway import ProxySection
from cortex_gateway.lease import Upstream

REQUEST = b'{"model":"qwen","messages":[{"role":"user","content":"hi"}]}'


def refused_url() -> str:
    """A loopback port with nobody listening (bound, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def router(*urls: str) -> FixedRouter:
    return FixedRouter({"qwen": [Upstream(f"node{i}", url, "qwen") for i, url in enumerate(urls)]})


async def relayed_over_two(first_answers: Script) -> tuple[httpx2.Response, tuple[int, int]]:
    """REQUEST relayed over two replicas, the first answering with `first_answers`, the second
    with a plain chat completion: the client's answer and the calls each replica received."""
    async with (
        FakeUpstream(first_answers) as first,
        FakeUpstream() as second,
        in_process(relay_app(router(first.base_url, second.base_url))) as client,
    ):
        response = await client.post("/v1/chat/completions", content=REQUEST)
    return response, (len(first.calls), len(second.calls))


async def test_first_refuses_second_serves() -> None:
    async with FakeUpstream() as second:
        fleet = router(refused_url(), second.base_url)
        app = relay_app(fleet)
        async with in_process(app) as client:
            response = await client.post("/v1/chat/completions", content=REQUEST)
    assert response.status_code == 200
    assert response.content == CHAT_JSON
    assert len(second.calls) == 1
    assert [upstream.node for upstream, _ in fleet.failures] == ["node0"]
    registry = app.state.metrics.registry
    assert (
        registry.get_sample_value("cortex_upstream_failures_total", {"model": "qwen", "node": "node0"}) == 1.0
    )
    assert registry.get_sample_value("cortex_requests_total", {"model": "qwen", "node": "node1"}) == 1.0
    assert all(count == 0 for count in fleet.in_flight.values())


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (503, b'{"error":{"message":"qwen is loading; retry shortly","code":"model_loading"}}'),
        (503, b'{"error":{"message":"qwen is unloading","code":"model_unloading"}}'),
        (404, b'{"error":{"message":"qwen is not loaded on this neuron","code":"model_not_found"}}'),
    ],
)
async def test_an_explicit_not_ready_goes_to_another_replica(status: int, body: bytes) -> None:
    response, calls = await relayed_over_two(Script(status=status, chunks=[body]))
    assert response.status_code == 200
    assert calls == (1, 1)


async def test_a_5xx_the_neuron_did_not_explain_is_relayed_not_repeated() -> None:
    body = b'{"error":{"message":"busy","type":"api_error","code":"overloaded"}}'
    script = Script(status=503, chunks=[body], extra_headers={"retry-after": "7"})
    response, calls = await relayed_over_two(script)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "7"
    assert response.content == body
    # The neuron received it and failed: it may have run, so it is run nowhere else.
    assert calls == (1, 0)


async def test_a_lone_replica_is_never_tried_twice() -> None:
    body = b'{"error":{"message":"qwen is loading","code":"model_loading"}}'
    async with (
        FakeUpstream(Script(status=503, chunks=[body])) as only,
        in_process(relay_app(router(only.base_url))) as client,
    ):
        response = await client.post("/v1/chat/completions", content=REQUEST)
    assert response.status_code == 503
    assert len(only.calls) == 1


async def test_upstream_dies_before_first_body_byte_is_not_repeated() -> None:
    dying = Script(content_type="text/event-stream", chunks=sse_stream(["a"]), die_after=0)
    response, calls = await relayed_over_two(dying)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_connection_error"
    assert calls == (1, 0)


async def test_no_retry_after_first_byte() -> None:
    chunks = sse_stream(["one", "two", "three"])
    dying = Script(content_type="text/event-stream", chunks=chunks, die_after=3)
    async with FakeUpstream(dying) as first, FakeUpstream() as second:
        fleet = router(first.base_url, second.base_url)
        app = relay_app(fleet)
        async with in_process(app) as client:
            response = await client.post("/v1/chat/completions", content=REQUEST)
    assert (len(first.calls), len(second.calls)) == (1, 0)
    assert response.status_code == 200  # the status went out with the first chunk
    relayed = b"".join(chunks[:3])
    assert response.content.startswith(relayed)
    tail = response.content[len(relayed) :]
    assert b'"code": "upstream_stream_error"' in tail or b'"code":"upstream_stream_error"' in tail
    assert b"[DONE]" not in response.content
    labels = {"model": "qwen", "node": "node0"}
    assert app.state.metrics.registry.get_sample_value("cortex_request_errors_total", labels) == 1.0


@pytest.mark.parametrize("attempts", [1, 2])
async def test_unreachable_is_503_with_retry_after_in_openai_shape(attempts: int) -> None:
    config = ProxySection(max_attempts=attempts)
    fleet = router(refused_url())
    app = relay_app(fleet, config)
    async with in_process(app) as client:
        response = await client.post("/v1/chat/completions", content=REQUEST)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    error = response.json()["error"]
    assert error["code"] == "upstream_unavailable"
    assert error["type"] == "api_error"
    assert "node0" in error["message"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert len(fleet.failures) == 1  # one replica: tried once, whatever max_attempts
    assert fleet.in_flight[fleet._table["qwen"][0]] == 0
    labels = {"model": "qwen", "node": "node0"}
    registry = app.state.metrics.registry
    assert registry.get_sample_value("cortex_responses_total", {**labels, "status": "503"}) == 1.0
    assert registry.get_sample_value("cortex_request_errors_total", labels) == 1.0


async def test_headers_never_arrive_is_504_and_the_request_is_not_repeated() -> None:
    config = ProxySection(idle_timeout_secs=0.2, max_attempts=2)
    async with (
        FakeUpstream(Script(before_headers=2.0)) as slow,
        FakeUpstream() as second,
        in_process(relay_app(router(slow.base_url, second.base_url), config)) as client,
    ):
        response = await client.post("/v1/chat/completions", content=REQUEST)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert (len(slow.calls), len(second.calls)) == (1, 0)


async def test_upstream_that_hangs_up_without_answering_is_502() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        fleet = router(f"http://127.0.0.1:{port}")
        async with in_process(relay_app(fleet)) as client:
            response = await client.post("/v1/chat/completions", content=REQUEST)
    assert response.status_code == 502
    assert "retry-after" not in response.headers
    assert response.json()["error"]["code"] == "upstream_connection_error"
    assert len(fleet.failures) == 1
