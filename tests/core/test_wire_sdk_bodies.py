"""Request bodies exactly as the official SDKs send them decode into our Structs and encode back
to the same JSON; wrong types are refused with the field's path.

The bodies are captured from `openai.AsyncOpenAI` / `anthropic.AsyncAnthropic` pointed at an
`httpx2.MockTransport`, so they change when the SDKs change.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import httpx2
import msgspec
import openai
import pytest

from cortex_core.anthropic.messages import CountTokensRequest, MessagesRequest
from cortex_core.errors import ApiError, decode_json_body
from cortex_core.openai.chat import ChatCompletionRequest
from cortex_core.openai.completions import CompletionRequest, prompt_texts_or_ids
from cortex_core.openai.responses import ResponsesRequest

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city"],
}

# Minimal valid replies, so that the SDK call completes after its body was recorded.
_CHAT_REPLY = {
    "id": "c1",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
}
_COMPLETION_REPLY = {
    "id": "t1",
    "object": "text_completion",
    "created": 1,
    "model": "m",
    "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}],
}
_RESPONSE_REPLY = {
    "id": "resp_1",
    "object": "response",
    "created_at": 1,
    "model": "m",
    "status": "completed",
    "output": [],
    "parallel_tool_calls": True,
    "tool_choice": "auto",
    "tools": [],
}
_MESSAGE_REPLY = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "m",
    "content": [{"type": "text", "text": "ok"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 1, "output_tokens": 1},
}


def _reply(request: httpx2.Request) -> httpx2.Response:
    path = request.url.path
    body = msgspec.json.decode(request.content)
    if body.get("stream"):
        return httpx2.Response(
            200, content=b"data: [DONE]\n\n", headers={"content-type": "text/event-stream"}
        )
    if path.endswith("/chat/completions"):
        return httpx2.Response(200, json=_CHAT_REPLY)
    if path.endswith("/completions"):
        return httpx2.Response(200, json=_COMPLETION_REPLY)
    if path.endswith("/responses"):
        return httpx2.Response(200, json=_RESPONSE_REPLY)
    if path.endswith("/count_tokens"):
        return httpx2.Response(200, json={"input_tokens": 3})
    return httpx2.Response(200, json=_MESSAGE_REPLY)


async def _capture(call: Callable[[openai.AsyncOpenAI, anthropic.AsyncAnthropic], Awaitable[Any]]) -> bytes:
    bodies: list[bytes] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        bodies.append(request.content)
        return _reply(request)

    async with httpx2.AsyncClient(transport=httpx2.MockTransport(handler)) as http:
        oai = openai.AsyncOpenAI(api_key="k", base_url="http://test/v1", http_client=http, max_retries=0)
        ant = anthropic.AsyncAnthropic(api_key="k", base_url="http://test", http_client=http, max_retries=0)
        result = await call(oai, ant)
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
    assert len(bodies) == 1
    return bodies[0]


def _chat_everything(oai: openai.AsyncOpenAI, _: anthropic.AsyncAnthropic) -> Awaitable[Any]:
    return oai.chat.completions.create(
        model="qwen3",
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "developer", "content": [{"type": "text", "text": "Prefer metric."}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather in Paris? And what is this?"},
                    {
                        "type": "image_url",
                        "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "low"},
                    },
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                ],
                "name": "alice",
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
                "reasoning_content": "The user wants weather.",
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
            {"role": "assistant", "content": [{"type": "text", "text": "21 C."}], "reasoning": "Done."},
        ],
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Current weather",
                    "parameters": WEATHER_SCHEMA,
                    "strict": True,
                },
            }
        ],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER_SCHEMA}},
        stream=True,
        stream_options={"include_usage": True},
        stop=["\n\n", "END"],
        seed=7,
        n=1,
        logprobs=True,
        top_logprobs=2,
        reasoning_effort="low",
        max_tokens=64,
        max_completion_tokens=128,
        temperature=0.2,
        top_p=0.9,
        presence_penalty=0.1,
        frequency_penalty=0.2,
        logit_bias={"42": -100},
        user="u-1",
        metadata={"team": "a"},
        extra_body={
            "top_k": 20,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "chat_template_kwargs": {"enable_thinking": False},
        },
    )


def _chat_plain(oai: openai.AsyncOpenAI, _: anthropic.AsyncAnthropic) -> Awaitable[Any]:
    return oai.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        tool_choice="none",
        stop="x",
        response_format={"type": "json_object"},
    )


def _completion_texts(oai: openai.AsyncOpenAI, _: anthropic.AsyncAnthropic) -> Awaitable[Any]:
    return oai.completions.create(
        model="m",
        prompt=["a", "b"],
        echo=True,
        suffix="!",
        stop="\n",
        logprobs=2,
        max_tokens=5,
        seed=1,
        best_of=1,
    )


def _completion_ids(oai: openai.AsyncOpenAI, _: anthropic.AsyncAnthropic) -> Awaitable[Any]:
    return oai.completions.create(
        model="m", prompt=[1, 2, 3], stream=True, stream_options={"include_usage": True}
    )


def _responses_everything(oai: openai.AsyncOpenAI, _: anthropic.AsyncAnthropic) -> Awaitable[Any]:
    return oai.responses.create(
        model="m",
        instructions="Be brief.",
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "and this picture"},
                    {"type": "input_image", "image_url": f"data:image/png;base64,{PNG}", "detail": "auto"},
                ],
            },
            {
                "type": "reasoning",
                "id": "rs_1",
                "summary": [{"type": "summary_text", "text": "need weather"}],
                "content": [{"type": "reasoning_text", "text": "call the tool"}],
            },
            {
                "type": "message",
                "role": "assistant",
                "id": "msg_1",
                "status": "completed",
                "content": [{"type": "output_text", "text": "Checking.", "annotations": []}],
            },
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "get_weather",
                "arguments": '{"city":"Paris"}',
            },
            {"type": "function_call_output", "call_id": "call_1", "output": '{"temp": 21}'},
        ],
        tools=[
            {
                "type": "function",
                "name": "get_weather",
                "description": "Current weather",
                "parameters": WEATHER_SCHEMA,
                "strict": True,
            },
            {"type": "web_search"},
        ],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=100,
        temperature=0.3,
        top_p=0.8,
        parallel_tool_calls=True,
        reasoning={"effort": "medium", "summary": "auto"},
        text={"format": {"type": "json_schema", "name": "w", "schema": WEATHER_SCHEMA, "strict": True}},
        stream=True,
        store=False,
        metadata={"k": "v"},
        user="u",
    )


def _responses_string(oai: openai.AsyncOpenAI, _: anthropic.AsyncAnthropic) -> Awaitable[Any]:
    return oai.responses.create(model="m", input="hello", previous_response_id="resp_0", tool_choice="auto")


def _anthropic_everything(_: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic) -> Awaitable[Any]:
    return ant.messages.create(
        model="claude-x",
        max_tokens=1024,
        system=[
            {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Be careful."},
        ],
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in these images?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "Look closely.", "signature": "sig"},
                    {"type": "redacted_thinking", "data": "opaque"},
                    {"type": "text", "text": "Let me check the weather too."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "21 C"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_2",
                        "content": [{"type": "text", "text": "boom"}],
                        "is_error": True,
                        "cache_control": {"type": "ephemeral", "ttl": "5m"},
                    },
                    {"type": "text", "text": "thanks"},
                ],
            },
        ],
        tools=[
            {
                "name": "get_weather",
                "description": "Current weather",
                "input_schema": WEATHER_SCHEMA,
                "cache_control": {"type": "ephemeral"},
            }
        ],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        stop_sequences=["</answer>"],
        thinking={"type": "enabled", "budget_tokens": 512},
        metadata={"user_id": "u-1"},
        output_config={"effort": "high"},
        extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 40},
    )


def _anthropic_stream(_: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic) -> Awaitable[Any]:
    return ant.messages.create(
        model="m",
        max_tokens=5,
        system="plain system",
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        tool_choice={"type": "tool", "name": "f"},
        tools=[{"name": "f", "input_schema": {"type": "object"}}],
        thinking={"type": "disabled"},
        stream=True,
    )


def _anthropic_count(_: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic) -> Awaitable[Any]:
    return ant.messages.count_tokens(
        model="m",
        system="s",
        messages=[{"role": "user", "content": [{"type": "text", "text": "count me"}]}],
        tools=[{"name": "f", "input_schema": {"type": "object"}}],
        tool_choice={"type": "none"},
        thinking={"type": "adaptive"},
    )


SDK_CALLS = [
    pytest.param(_chat_everything, ChatCompletionRequest, id="chat-everything"),
    pytest.param(_chat_plain, ChatCompletionRequest, id="chat-plain"),
    pytest.param(_completion_texts, CompletionRequest, id="completion-texts"),
    pytest.param(_completion_ids, CompletionRequest, id="completion-token-ids"),
    pytest.param(_responses_everything, ResponsesRequest, id="responses-everything"),
    pytest.param(_responses_string, ResponsesRequest, id="responses-string"),
    pytest.param(_anthropic_everything, MessagesRequest, id="anthropic-everything"),
    pytest.param(_anthropic_stream, MessagesRequest, id="anthropic-stream"),
    pytest.param(_anthropic_count, CountTokensRequest, id="anthropic-count-tokens"),
]


@pytest.mark.parametrize(("call", "wire_type"), SDK_CALLS)
async def test_sdk_body_round_trips_without_loss(
    call: Callable[[openai.AsyncOpenAI, anthropic.AsyncAnthropic], Awaitable[Any]], wire_type: type[Any]
) -> None:
    body = await _capture(call)
    decoded = decode_json_body(body, wire_type)
    assert msgspec.json.decode(msgspec.json.encode(decoded)) == msgspec.json.decode(body)


async def test_completion_prompt_forms() -> None:
    texts = decode_json_body(await _capture(_completion_texts), CompletionRequest)
    ids = decode_json_body(await _capture(_completion_ids), CompletionRequest)
    assert prompt_texts_or_ids(texts) == ["a", "b"]
    assert prompt_texts_or_ids(ids) == [[1, 2, 3]]
    nested = CompletionRequest(model="m", prompt=[[1, 2], [3]])
    assert prompt_texts_or_ids(nested) == [[1, 2], [3]]
    with pytest.raises(ApiError) as err:
        prompt_texts_or_ids(CompletionRequest(model="m", prompt=["a", 1]))
    assert err.value.param == "prompt"


@pytest.mark.parametrize(
    ("wire_type", "body", "path"),
    [
        (
            ChatCompletionRequest,
            {"model": "m", "messages": [{"role": "user", "content": 5}]},
            "$.messages[0].content",
        ),
        (
            ChatCompletionRequest,
            {"model": "m", "messages": [{"role": "robot", "content": "x"}]},
            "$.messages[0].role",
        ),
        (ChatCompletionRequest, {"model": "m", "messages": [], "temperature": "hot"}, "$.temperature"),
        (ChatCompletionRequest, {"model": "m", "messages": [], "tool_choice": "sometimes"}, "$.tool_choice"),
        (
            ChatCompletionRequest,
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "$.messages[0].content[0].type",
        ),
        (
            ChatCompletionRequest,
            {
                "model": "m",
                "messages": [{"role": "assistant", "tool_calls": [{"id": "1", "function": {"name": "f"}}]}],
            },
            "$.messages[0].tool_calls[0].function",
        ),
        (ChatCompletionRequest, {"model": "m", "messages": [], "stop": 3}, "$.stop"),
        (CompletionRequest, {"model": "m", "prompt": {"a": 1}}, "$.prompt"),
        (ResponsesRequest, {"model": "m", "input": 3}, "$.input"),
        (
            ResponsesRequest,
            {"model": "m", "input": [{"role": "user", "content": [{"type": "x"}]}]},
            "$.input[0].content[0].type",
        ),
        (MessagesRequest, {"model": "m", "max_tokens": "many", "messages": []}, "$.max_tokens"),
        (MessagesRequest, {"model": "m", "messages": [], "system": [{"type": "text"}]}, "$.system[0]"),
        (
            MessagesRequest,
            {
                "model": "m",
                "max_tokens": 1,
                "messages": [{"role": "user", "content": [{"type": "document"}]}],
            },
            "$.messages[0].content[0].type",
        ),
        (
            MessagesRequest,
            {"model": "m", "max_tokens": 1, "messages": [], "thinking": {"type": "enabled"}},
            "$.thinking",
        ),
        (
            MessagesRequest,
            {"model": "m", "max_tokens": 1, "messages": [], "tool_choice": {"type": "maybe"}},
            "$.tool_choice.type",
        ),
    ],
)
def test_wrong_types_are_refused_with_the_field_path(
    wire_type: type[Any], body: dict[str, Any], path: str
) -> None:
    with pytest.raises(ApiError) as err:
        decode_json_body(msgspec.json.encode(body), wire_type)
    assert err.value.status == 400
    assert err.value.param == path, err.value.message
    assert path in err.value.message


def test_unknown_fields_are_ignored() -> None:
    body = b'{"model": "m", "messages": [{"role": "user", "content": "x", "zzz": 1}], "brand_new_option": {"a": 1}}'
    request = decode_json_body(body, ChatCompletionRequest)
    assert request.messages[0].content == "x"


def test_missing_top_level_field_is_named() -> None:
    with pytest.raises(ApiError) as err:
        decode_json_body(b'{"model": "m", "messages": []}', MessagesRequest)
    assert "`max_tokens`" in err.value.message
