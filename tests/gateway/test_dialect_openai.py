"""The official `openai` SDK through the real gateway app: chat, completions and responses,
streamed and not, in front of a scripted neuron (the gateway relays these byte for byte).

The Responses bodies the scripted neuron answers are rendered by cortex-core's own
converters from chat chunks, which is what a real neuron does.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
import openai
import pytest
import pytest_asyncio
from starlette.applications import Starlette
from support.fake_neuron import gateway, in_process_client, relaying_neuron
from support.scripted_upstream import (
    Chunk,
    Reply,
    ScriptedNeuron,
    finish,
    fold_chunks,
    reasoning,
    role,
    text,
    tool_arguments,
    tool_start,
)

from cortex_core.config.catalogue import ModelCatalogue, ModelProfile
from cortex_core.openai.chat import ChatCompletion, ChatCompletionChunk
from cortex_core.openai.responses import ResponsesRequest
from cortex_core.openai.responses_convert import response_from_chat_completion
from cortex_core.openai.responses_stream import ResponsesStreamConverter
from cortex_core.sse import encode_event

MODEL = "org/chat"
ALIAS = "gpt-local"
CATALOGUE = ModelCatalogue([ModelProfile(id=MODEL)], {ALIAS: MODEL})
ASK: Any = [{"role": "user", "content": "Weather in Paris?"}]
TOOLS: Any = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
ANSWER = [
    role(),
    reasoning("Need the tool."),
    text("Checking."),
    tool_start(0, "call_1", "get_weather", '{"city": '),
    tool_arguments(0, '"Paris"}'),
    finish("tool_calls"),
]


@dataclass
class Stack:
    upstream: ScriptedNeuron
    app: Starlette
    sdk: openai.AsyncOpenAI


@pytest_asyncio.fixture(loop_scope="function")
async def stack() -> AsyncIterator[Stack]:
    async with ScriptedNeuron(Reply(ANSWER)) as upstream:
        neuron = relaying_neuron(upstream.base_url, MODEL)
        async with gateway([neuron], CATALOGUE) as (app, _):
            sdk = openai.AsyncOpenAI(
                base_url="http://gateway/v1", api_key="x", max_retries=0, http_client=in_process_client(app)
            )
            async with sdk:
                yield Stack(upstream, app, sdk)


async def test_chat_create_and_stream_agree_with_tools_and_reasoning(stack: Stack) -> None:
    created = await stack.sdk.chat.completions.create(model=ALIAS, messages=ASK, tools=TOOLS)
    message = created.choices[0].message
    assert message.content == "Checking."
    assert message.tool_calls is not None
    call = message.tool_calls[0]
    assert call.type == "function"
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == (
        "call_1",
        "get_weather",
        {"city": "Paris"},
    )
    assert (message.model_extra or {})["reasoning_content"] == "Need the tool."
    assert created.choices[0].finish_reason == "tool_calls"

    async with stack.sdk.chat.completions.stream(
        model=ALIAS, messages=ASK, tools=TOOLS, stream_options={"include_usage": True}
    ) as stream:
        final = await stream.get_final_completion()
    streamed = final.choices[0].message
    assert streamed.content == message.content
    assert streamed.tool_calls is not None
    assert streamed.tool_calls[0].function.arguments == call.function.arguments
    assert final.usage is not None and final.usage.prompt_tokens == 11
    assert [c.body["model"] for c in stack.upstream.calls] == [MODEL, MODEL]  # alias rewritten


async def test_chat_stream_chunks_arrive_intact(stack: Stack) -> None:
    stream = await stack.sdk.chat.completions.create(model=MODEL, messages=ASK, stream=True)
    chunks = [chunk async for chunk in stream]
    pieces = [(c.choices[0].delta.content or "") for c in chunks if c.choices]
    assert "".join(pieces) == "Checking."
    reasoning_pieces = [
        (c.choices[0].delta.model_extra or {}).get("reasoning_content") for c in chunks if c.choices
    ]
    assert "Need the tool." in reasoning_pieces


def completion_bodies(model: str) -> tuple[bytes, bytes]:
    body = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "text": " Paris.", "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": 6, "completion_tokens": 2, "total_tokens": 8},
    }
    frames = [
        {
            **body,
            "choices": [{"index": 0, "text": piece, "finish_reason": None, "logprobs": None}],
            "usage": None,
        }
        for piece in (" Par", "is.")
    ]
    frames.append({**body, "choices": [{"index": 0, "text": "", "finish_reason": "stop", "logprobs": None}]})
    stream = b"".join(b"data: " + json.dumps(f).encode() + b"\n\n" for f in frames) + b"data: [DONE]\n\n"
    return json.dumps(body).encode(), stream


async def test_completions_streamed_and_not(stack: Stack) -> None:
    plain, streamed = completion_bodies(MODEL)
    stack.upstream.raw[("/v1/completions", False)] = ("application/json", plain)
    stack.upstream.raw[("/v1/completions", True)] = ("text/event-stream", streamed)
    created = await stack.sdk.completions.create(model=ALIAS, prompt="The capital of France is", max_tokens=4)
    assert created.choices[0].text == " Paris."
    stream = await stack.sdk.completions.create(model=ALIAS, prompt="The capital of France is", stream=True)
    assert "".join([c.choices[0].text async for c in stream if c.choices]) == " Paris."
    assert all(c.body["model"] == MODEL for c in stack.upstream.calls)


def responses_bodies(chunks: list[Chunk], request: dict[str, Any]) -> tuple[bytes, bytes]:
    """What a neuron answers to a Responses request whose chat answer is `chunks`."""
    parsed = msgspec.convert(request, ResponsesRequest)
    usage = Reply(chunks).usage()
    completion = msgspec.convert(fold_chunks(chunks, usage, MODEL), ChatCompletion)
    plain = response_from_chat_completion(completion, parsed, response_id="resp_1", created_at=1)
    converter = ResponsesStreamConverter(parsed, "resp_1", 1)
    events = converter.start()
    for c in [*chunks, {**chunks[-1], "choices": [], "usage": usage}]:
        events += converter.feed(msgspec.convert(c, ChatCompletionChunk))
    events += converter.finish()
    return msgspec.json.encode(plain), b"".join(encode_event(e) for e in events)


async def test_responses_streamed_and_not_with_reasoning_and_function_call(stack: Stack) -> None:
    request = {"model": MODEL, "input": "Weather in Paris?"}
    plain, streamed = responses_bodies(ANSWER, request)
    stack.upstream.raw[("/v1/responses", False)] = ("application/json", plain)
    stack.upstream.raw[("/v1/responses", True)] = ("text/event-stream", streamed)
    tools: Any = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]

    created = await stack.sdk.responses.create(model=ALIAS, input="Weather in Paris?", tools=tools)
    assert created.output_text == "Checking."
    kinds = [item.type for item in created.output]
    assert kinds == ["reasoning", "message", "function_call"]
    call = created.output[2]
    assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Paris"}

    async with stack.sdk.responses.stream(model=ALIAS, input="Weather in Paris?", tools=tools) as stream:
        deltas = [event.delta async for event in stream if event.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(deltas) == "Checking."
    assert [item.type for item in final.output] == kinds
    assert final.usage is not None and final.usage.input_tokens == 11
    assert all(c.path == "/v1/responses" and c.body["model"] == MODEL for c in stack.upstream.calls)


async def test_openai_routes_keep_the_openai_error_shape(stack: Stack) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        await stack.sdk.chat.completions.create(model="org/nope", messages=ASK)
    assert raised.value.code == "model_not_found"
    stack.upstream.reply = Reply(
        status=429, retry_after="3", error={"error": {"message": "queue full", "type": "rate_limit_error"}}
    )
    with pytest.raises(openai.RateLimitError) as limited:
        await stack.sdk.chat.completions.create(model=MODEL, messages=ASK)
    assert limited.value.response.headers["retry-after"] == "3"
