"""The proxy relays bytes unchanged, rewrites only an alias's `model`, and forwards client headers."""

from __future__ import annotations

import json

import msgspec
import pytest
from support.fake_upstream import CHAT_JSON, FakeUpstream, Script, in_process, relay_app, sse_stream
from support.fixed_router import FixedRouter, read_model

from cortex_core.errors import ApiError
from cortex_gateway.lease import Upstream
from cortex_gateway.proxy import request_headers, response_headers, rewrite_model

REQUEST = b'{"model": "qwen", "messages": [{"role": "user", "content": "hi"}], "stream": false}'


def router_for(*upstreams: FakeUpstream, aliases: dict[str, str] | None = None) -> FixedRouter:
    table = {"qwen": [Upstream(f"node{i}", u.base_url, "qwen") for i, u in enumerate(upstreams)]}
    return FixedRouter(table, aliases)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/responses"])
async def test_json_body_relayed_byte_for_byte(path: str) -> None:
    async with FakeUpstream() as upstream:
        app = relay_app(router_for(upstream))
        async with in_process(app) as client:
            response = await client.post(path, content=REQUEST, headers={"content-type": "application/json"})
    assert response.status_code == 200
    assert response.content == CHAT_JSON
    assert response.headers["content-type"].startswith("application/json")
    assert upstream.calls[0].path == path
    assert upstream.calls[0].body == REQUEST  # no alias: the client's bytes, untouched


async def test_sse_stream_relayed_byte_for_byte_and_measured() -> None:
    chunks = sse_stream(["Hel", "lo", " there"], prompt_tokens=7)
    script = Script(content_type="text/event-stream", chunks=chunks, delay=0.01)
    async with FakeUpstream(script) as upstream:
        router = router_for(upstream)
        app = relay_app(router)
        async with in_process(app) as client:
            response = await client.post("/v1/chat/completions", content=REQUEST)
    assert response.status_code == 200
    assert response.content == b"".join(chunks)
    assert response.headers["content-type"].startswith("text/event-stream")
    registry = app.state.metrics.registry
    labels = {"model": "qwen", "node": "node0"}
    assert registry.get_sample_value("cortex_requests_total", labels) == 1.0
    assert registry.get_sample_value("cortex_responses_total", {**labels, "status": "200"}) == 1.0
    assert registry.get_sample_value("cortex_prompt_tokens_total", labels) == 7.0
    assert registry.get_sample_value("cortex_completion_tokens_total", labels) == 3.0
    assert registry.get_sample_value("cortex_time_to_first_token_seconds_count", labels) == 1.0
    assert registry.get_sample_value("cortex_time_per_output_token_seconds_count", labels) == 1.0
    assert registry.get_sample_value("cortex_requests_in_flight", labels) == 0.0
    assert router.in_flight[router._table["qwen"][0]] == 0  # the lease was released


async def test_alias_rewrites_only_the_model() -> None:
    async with FakeUpstream() as upstream:
        router = router_for(upstream, aliases={"fast": "qwen"})
        async with in_process(relay_app(router)) as client:
            response = await client.post(
                "/v1/chat/completions", content=REQUEST.replace(b'"qwen"', b'"fast"')
            )
    assert response.status_code == 200
    sent = upstream.calls[0].body
    assert json.loads(sent) == json.loads(REQUEST)
    assert sent == REQUEST  # spliced: the client's formatting survives


async def test_client_headers_forwarded_hop_by_hop_and_client_key_dropped() -> None:
    async with FakeUpstream() as upstream, in_process(relay_app(router_for(upstream))) as client:
        await client.post(
            "/v1/chat/completions",
            content=REQUEST,
            headers={
                "x-include-thinking": "true",
                "authorization": "Bearer sk-client",
                "user-agent": "openai-python/9",
                "content-type": "application/json",
                "connection": "keep-alive",
                "accept-encoding": "gzip",
            },
        )
    headers = {k.lower(): v for k, v in upstream.calls[0].headers.items()}
    assert headers["x-include-thinking"] == "true"
    assert "authorization" not in headers  # the gateway key stays at the gateway
    assert headers["user-agent"] == "openai-python/9"
    assert headers["content-type"] == "application/json"
    assert headers["accept-encoding"] == "identity"
    assert headers["host"] == f"127.0.0.1:{upstream.port}"
    assert headers["content-length"] == str(len(REQUEST))


async def test_upstream_error_status_and_headers_pass_through() -> None:
    body = b'{"error":{"message":"queue full","type":"rate_limit_error","code":"queue_full"}}'
    script = Script(status=429, chunks=[body], extra_headers={"retry-after": "3"})
    async with FakeUpstream(script) as upstream, in_process(relay_app(router_for(upstream))) as client:
        response = await client.post("/v1/chat/completions", content=REQUEST)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"
    assert response.content == body
    assert len(upstream.calls) == 1  # 4xx is the neuron's answer, not a failure to retry


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"model":"fast","messages":[]}', b'{"model":"qwen","messages":[]}'),
        (b'{ "model" :\n "fast" , "x": 1}', b'{ "model" :\n "qwen" , "x": 1}'),
        (
            b'{"messages":[{"content":"say \\"model\\""}],"model":"fast"}',
            b'{"messages":[{"content":"say \\"model\\""}],"model":"qwen"}',
        ),
        (b'{"model":"f\\"a\\\\","stream":true}', b'{"model":"qwen","stream":true}'),
    ],
)
def test_rewrite_model_splices(body: bytes, expected: bytes) -> None:
    assert rewrite_model(body, "qwen") == expected


def test_rewrite_model_nested_key_falls_back_to_decode() -> None:
    body = b'{"tools":[{"parameters":{"properties":{"model":{"type":"string"}}}}],"model":"fast"}'
    rewritten = rewrite_model(body, "qwen")
    document = msgspec.json.decode(rewritten)
    assert document["model"] == "qwen"
    assert document["tools"] == msgspec.json.decode(body)["tools"]


def test_read_model_names_the_problem() -> None:
    assert read_model(b'{"model":"qwen","messages":[]}') == "qwen"
    for bad in (b"{}", b'{"model":3}', b"not json", b""):
        with pytest.raises(ApiError) as caught:
            read_model(bad)
        assert caught.value.status == 400
        assert caught.value.code == "missing_model_field"


def test_header_filters() -> None:
    sent = request_headers([(b"Host", b"x"), (b"Content-Length", b"3"), (b"X-Include-Thinking", b"true")])
    assert sent == [("X-Include-Thinking", "true"), ("accept-encoding", "identity")]
    relayed = response_headers(
        [(b"Transfer-Encoding", b"chunked"), (b"Content-Type", b"text/event-stream"), (b"Date", b"x")]
    )
    assert relayed == [(b"Content-Type", b"text/event-stream")]


async def test_cookies_from_one_answer_never_reach_another_request() -> None:
    script = Script(extra_headers={"set-cookie": "session=client-a; Path=/"})
    async with FakeUpstream(script) as upstream:
        # A host name, not an IP: aiohttp's default jar would keep this cookie and send it on.
        by_name = Upstream("node0", upstream.base_url.replace("127.0.0.1", "localhost"), "qwen")
        async with in_process(relay_app(FixedRouter({"qwen": [by_name]}))) as client:
            first = await client.post("/v1/chat/completions", content=REQUEST)
            client.cookies.clear()
            await client.post("/v1/chat/completions", content=REQUEST)
    assert first.headers["set-cookie"].startswith("session=client-a")  # relayed to its client
    assert "cookie" not in {k.lower() for k in upstream.calls[1].headers}
