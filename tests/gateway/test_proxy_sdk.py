"""The official OpenAI SDK through the proxy: streams parse, and a stream cut mid-way raises."""

from __future__ import annotations

import httpx2
import openai
import pytest
from support.fake_upstream import FakeUpstream, Script, in_process, relay_app, sse_stream
from support.fixed_router import FixedRouter

from cortex_gateway.lease import Upstream


def sdk(client: httpx2.AsyncClient) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url="http://gateway/v1", api_key="sk-test", http_client=client, max_retries=0
    )


async def test_sdk_streams_through_the_proxy_with_an_alias() -> None:
    script = Script(content_type="text/event-stream", chunks=sse_stream(["Hel", "lo"], prompt_tokens=3))
    async with FakeUpstream(script) as upstream:
        fleet = FixedRouter(
            {"org/qwen": [Upstream("n", upstream.base_url, "org/qwen")]}, {"qwen": "org/qwen"}
        )
        async with in_process(relay_app(fleet)) as client:
            stream = await sdk(client).chat.completions.create(
                model="qwen",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                extra_headers={"x-include-thinking": "true"},
            )
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "Hello"
    assert upstream.calls[0].headers.get("x-include-thinking") == "true"
    assert b'"model":"org/qwen"' in upstream.calls[0].body


async def test_sdk_raises_when_the_stream_is_cut_mid_way() -> None:
    script = Script(content_type="text/event-stream", chunks=sse_stream(["a", "b", "c"]), die_after=2)
    async with FakeUpstream(script) as upstream:
        fleet = FixedRouter({"qwen": [Upstream("n", upstream.base_url, "qwen")]})
        async with in_process(relay_app(fleet)) as client:
            stream = await sdk(client).chat.completions.create(
                model="qwen", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            with pytest.raises(openai.APIError, match="upstream stream failed"):
                async for _ in stream:
                    pass
