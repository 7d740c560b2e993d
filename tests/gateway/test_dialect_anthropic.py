"""`/v1/messages` and `/v1/messages/count_tokens` through the real gateway app.

The official `anthropic` SDK drives the app in process; behind it a fake neuron answers the
management API and a scripted neuron (loopback) replays OpenAI chat chunk sequences, so
the gateway's conversion, relay, failover and metrics all run for real.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx2
import pytest
import pytest_asyncio
from starlette.applications import Starlette
from support.fake_neuron import FakeNeuron, gateway, in_process_client, relaying_neuron
from support.scripted_upstream import (
    Chunk,
    Reply,
    ScriptedNeuron,
    finish,
    reasoning,
    role,
    text,
    tool_arguments,
    tool_start,
)

from cortex_core.config.catalogue import ModelCatalogue, ModelProfile
from cortex_core.sse import SSEDecoder

MODEL = "org/chat"
ALIAS = "claude-local"
CATALOGUE = ModelCatalogue([ModelProfile(id=MODEL)], {ALIAS: MODEL})
USER: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS: Any = [
    {
        "name": "get_weather",
        "description": "Weather for a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
    {"name": "get_time", "input_schema": {"type": "object", "properties": {"tz": {"type": "string"}}}},
]


@dataclass
class Stack:
    upstream: ScriptedNeuron
    app: Starlette
    http: httpx2.AsyncClient
    sdk: anthropic.AsyncAnthropic


@pytest_asyncio.fixture(loop_scope="function")
async def stack() -> AsyncIterator[Stack]:
    async with ScriptedNeuron() as upstream:
        neuron = relaying_neuron(upstream.base_url, MODEL)
        async with gateway([neuron], CATALOGUE) as (app, http):
            sdk = anthropic.AsyncAnthropic(
                base_url="http://gateway", api_key="x", max_retries=0, http_client=in_process_client(app)
            )
            async with sdk:
                yield Stack(upstream, app, http, sdk)


# --- upstream shapes -----------------------------------------------------------------------

TEXT = [role(), text("Hello"), text(", world"), finish("stop")]
THINKING = [role(), reasoning("Let me "), reasoning("think."), text("42"), finish("stop")]
THINKING_AS_REASONING = [role(), reasoning("Hmm.", field_name="reasoning"), text("Yes"), finish("stop")]
TEXT_THEN_TOOL = [
    role(),
    text("Let me check."),
    tool_start(0, "call_1", "get_weather"),
    tool_arguments(0, '{"city": '),
    tool_arguments(0, '"Paris"}'),
    finish("tool_calls"),
]
PARALLEL_TOOLS: Any = [
    role(),
    tool_start(0, "call_1", "get_weather", '{"city":'),
    tool_start(1, "call_2", "get_time", '{"tz":'),
    tool_arguments(0, ' "Paris"}'),
    tool_arguments(1, ' "CET"}'),
    finish("tool_calls"),
]
THINKING_THEN_TOOL = [
    role(),
    reasoning("The user wants weather."),
    tool_start(0, "call_9", "get_weather", '{"city": "Paris"}'),
    finish("tool_calls"),
]
STOP_SEQUENCE = [role(), text("one two"), finish("stop", stop_reason="END")]
MAX_TOKENS = [role(), text("cut"), finish("length")]

# (chunks, expected content as (type, payload), stop_reason, stop_sequence)
ANSWERS: dict[str, tuple[list[Chunk], list[tuple[str, Any]], str, str | None]] = {
    "text": (TEXT, [("text", "Hello, world")], "end_turn", None),
    "thinking": (THINKING, [("thinking", "Let me think."), ("text", "42")], "end_turn", None),
    "reasoning-field": (THINKING_AS_REASONING, [("thinking", "Hmm."), ("text", "Yes")], "end_turn", None),
    "text-then-tool": (
        TEXT_THEN_TOOL,
        [("text", "Let me check."), ("tool_use", ("call_1", "get_weather", {"city": "Paris"}))],
        "tool_use",
        None,
    ),
    "parallel-tools": (
        PARALLEL_TOOLS,
        [
            ("tool_use", ("call_1", "get_weather", {"city": "Paris"})),
            ("tool_use", ("call_2", "get_time", {"tz": "CET"})),
        ],
        "tool_use",
        None,
    ),
    "thinking-then-tool": (
        THINKING_THEN_TOOL,
        [("thinking", "The user wants weather."), ("tool_use", ("call_9", "get_weather", {"city": "Paris"}))],
        "tool_use",
        None,
    ),
    "stop-sequence": (STOP_SEQUENCE, [("text", "one two")], "stop_sequence", "END"),
    "max-tokens": (MAX_TOKENS, [("text", "cut")], "max_tokens", None),
}


def content_of(message: anthropic.types.Message) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for block in message.content:
        if block.type == "text":
            out.append(("text", block.text))
        elif block.type == "thinking":
            out.append(("thinking", block.thinking))
        elif block.type == "tool_use":
            out.append(("tool_use", (block.id, block.name, block.input)))
        else:
            out.append((block.type, None))
    return out


@pytest.mark.parametrize("name", list(ANSWERS))
async def test_sdk_create_and_stream_agree(stack: Stack, name: str) -> None:
    chunks, content, stop_reason, stop_sequence = ANSWERS[name]
    stack.upstream.reply = Reply(chunks)
    kwargs: dict[str, Any] = {"model": ALIAS, "max_tokens": 64, "messages": USER, "tools": TOOLS}

    created = await stack.sdk.messages.create(**kwargs)
    async with stack.sdk.messages.stream(**kwargs) as stream:
        events = [event.type async for event in stream]
        streamed = await stream.get_final_message()

    assert content_of(created) == content
    assert (created.stop_reason, created.stop_sequence) == (stop_reason, stop_sequence)
    assert created.model == MODEL
    assert created.usage.input_tokens == 11
    assert created.usage.output_tokens == stack.upstream.reply.usage()["completion_tokens"]
    assert streamed.model_dump() == created.model_dump()
    assert events.count("message_start") == 1 and events[-1] == "message_stop"

    plain, streaming = (call.body for call in stack.upstream.calls)
    assert plain["model"] == streaming["model"] == MODEL  # the alias resolved by the router
    assert plain["messages"] == [{"role": "user", "content": "What is the weather in Paris?"}]
    assert plain["tools"][0]["function"]["name"] == "get_weather"
    assert "stream" not in plain
    assert streaming["stream"] is True and streaming["stream_options"] == {
        "include_usage": True,
        "continuous_usage_stats": True,
    }


async def test_text_stream_yields_the_text_deltas(stack: Stack) -> None:
    stack.upstream.reply = Reply(TEXT)
    async with stack.sdk.messages.stream(model=MODEL, max_tokens=16, messages=USER) as stream:
        pieces = [piece async for piece in stream.text_stream]
    assert pieces == ["Hello", ", world"]


async def test_request_conversion_reaches_the_neuron(stack: Stack) -> None:
    stack.upstream.reply = Reply(TEXT)
    await stack.sdk.messages.create(
        model=MODEL,
        max_tokens=32,
        system="Be brief.",
        stop_sequences=["END"],
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "need a tool", "signature": ""},
                    {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"}],
            },
        ],
        tools=TOOLS,
        extra_headers={"x-include-thinking": "true"},
        # No longer SDK arguments, still sent by clients such as Claude Code.
        extra_body={"temperature": 0.2, "top_k": 5},
    )
    call = stack.upstream.calls[0]
    assert call.path == "/v1/chat/completions"
    assert "x-include-thinking" not in {name.lower() for name in call.headers}
    body = call.body
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "need a tool",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]
    assert body["chat_template_kwargs"] == {"enable_thinking": True, "thinking_budget": 1024}
    assert (body["max_tokens"], body["temperature"], body["top_k"], body["stop"]) == (32, 0.2, 5, ["END"])


async def test_include_thinking_header_turns_thinking_on_as_thinking_blocks(stack: Stack) -> None:
    stack.upstream.reply = Reply(THINKING)
    include = {"x-include-thinking": "true"}
    async with stack.sdk.messages.stream(
        model=MODEL, max_tokens=16, messages=USER, extra_headers=include
    ) as stream:
        message = await stream.get_final_message()
    assert content_of(message) == [("thinking", "Let me think."), ("text", "42")]
    await stack.sdk.messages.create(
        model=MODEL, max_tokens=16, messages=USER, extra_headers=include, thinking={"type": "disabled"}
    )
    await stack.sdk.messages.create(model=MODEL, max_tokens=16, messages=USER)
    switched_on, client_decided, untouched = (call.body for call in stack.upstream.calls)
    assert switched_on["chat_template_kwargs"] == {"enable_thinking": True}
    assert client_decided["chat_template_kwargs"] == {"enable_thinking": False}
    assert "chat_template_kwargs" not in untouched
    assert all("x-include-thinking" not in call.headers for call in stack.upstream.calls)


# --- the exact event sequence on the wire, per upstream shape -------------------------------


def summarize(event: dict[str, Any]) -> str:
    kind = event["type"]
    if kind == "content_block_start":
        return f"start {event['index']} {event['content_block']['type']}"
    if kind == "content_block_delta":
        return f"delta {event['index']} {event['delta']['type']}"
    if kind == "content_block_stop":
        return f"stop {event['index']}"
    if kind == "message_delta":
        return f"message_delta {event['delta']['stop_reason']}"
    if kind == "error":
        return f"error {event['error']['type']}"
    return str(kind)


OPEN = ["message_start", "ping"]
CLOSE_END = ["message_delta end_turn", "message_stop"]
CLOSE_TOOL = ["message_delta tool_use", "message_stop"]
GOLDEN: dict[str, tuple[Reply, list[str]]] = {
    "text": (
        Reply(TEXT),
        [*OPEN, "start 0 text", "delta 0 text_delta", "delta 0 text_delta", "stop 0", *CLOSE_END],
    ),
    "reasoning-then-text": (
        Reply(THINKING),
        [
            *OPEN,
            "start 0 thinking",
            "delta 0 thinking_delta",
            "delta 0 thinking_delta",
            "stop 0",
            "start 1 text",
            "delta 1 text_delta",
            "stop 1",
            *CLOSE_END,
        ],
    ),
    "text-then-tool": (
        Reply(TEXT_THEN_TOOL),
        [
            *OPEN,
            "start 0 text",
            "delta 0 text_delta",
            "stop 0",
            "start 1 tool_use",
            "delta 1 input_json_delta",
            "stop 1",
            *CLOSE_TOOL,
        ],
    ),
    "parallel-tools": (
        Reply(PARALLEL_TOOLS),
        [
            *OPEN,
            "start 0 tool_use",
            "delta 0 input_json_delta",
            "stop 0",
            "start 1 tool_use",
            "delta 1 input_json_delta",
            "stop 1",
            *CLOSE_TOOL,
        ],
    ),
    "reasoning-then-tool": (
        Reply(THINKING_THEN_TOOL),
        [
            *OPEN,
            "start 0 thinking",
            "delta 0 thinking_delta",
            "stop 0",
            "start 1 tool_use",
            "delta 1 input_json_delta",
            "stop 1",
            *CLOSE_TOOL,
        ],
    ),
    "error-frame-mid-stream": (
        Reply(TEXT, error_frame_after=2),
        [*OPEN, "start 0 text", "delta 0 text_delta", "error api_error"],
    ),
    "connection-lost-mid-stream": (
        Reply(TEXT, break_after=2),
        [*OPEN, "start 0 text", "delta 0 text_delta", "error api_error"],
    ),
}


async def post_stream(stack: Stack, body: dict[str, Any]) -> tuple[httpx2.Response, list[dict[str, Any]]]:
    response = await stack.http.post("/v1/messages", json={**body, "stream": True})
    decoder = SSEDecoder()
    messages = decoder.feed(response.content) + decoder.close()
    events = []
    for message in messages:
        event = json.loads(message.data)
        assert message.event == event["type"]  # `event:` names what `data:` holds
        events.append(event)
    return response, events


@pytest.mark.parametrize("name", list(GOLDEN))
async def test_golden_event_sequence(stack: Stack, name: str) -> None:
    reply, expected = GOLDEN[name]
    stack.upstream.reply = reply
    response, events = await post_stream(stack, {"model": MODEL, "max_tokens": 64, "messages": USER})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert [summarize(e) for e in events] == expected


async def test_usage_from_the_last_chunk_reaches_message_delta(stack: Stack) -> None:
    stack.upstream.reply = Reply(TEXT, prompt_tokens=20, cached_tokens=8, completion_tokens=2)
    _, events = await post_stream(stack, {"model": MODEL, "max_tokens": 64, "messages": USER})
    start, delta = events[0], events[-2]
    assert start["message"]["usage"]["output_tokens"] == 0
    assert delta["usage"] == {
        "output_tokens": 2,
        "input_tokens": 12,
        "cache_read_input_tokens": 8,
        "cache_creation_input_tokens": 0,
    }


async def test_tool_arguments_arrive_whole_in_the_stream(stack: Stack) -> None:
    stack.upstream.reply = Reply(PARALLEL_TOOLS)
    _, events = await post_stream(stack, {"model": MODEL, "max_tokens": 64, "messages": USER})
    arguments = [e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta"]
    assert [json.loads(a) for a in arguments] == [{"city": "Paris"}, {"tz": "CET"}]


# --- errors: the SDK's typed exceptions -----------------------------------------------------


async def test_unknown_model_is_not_found(stack: Stack) -> None:
    with pytest.raises(anthropic.NotFoundError) as raised:
        await stack.sdk.messages.create(model="org/nope", max_tokens=8, messages=USER)
    assert raised.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert stack.upstream.calls == []


async def refused(stack: Stack, **request: Any) -> anthropic.BadRequestError:
    """The SDK's error for a create the gateway answers with a 400 (max_tokens 8 and USER
    unless `request` says otherwise)."""
    with pytest.raises(anthropic.BadRequestError) as raised:
        await stack.sdk.messages.create(**{"model": MODEL, "max_tokens": 8, "messages": USER, **request})
    return raised.value


HOLOGRAM: Any = [{"role": "user", "content": [{"type": "hologram", "data": "?"}]}]


async def test_bad_body_names_the_field(stack: Stack) -> None:
    refusal = await refused(stack, messages=HOLOGRAM)
    assert refusal.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "$.messages[0].content[0]" in refusal.message
    response = await stack.http.post("/v1/messages", json={"model": MODEL, "messages": USER})
    assert response.status_code == 400
    assert "max_tokens" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": []}, "messages"),
        ({"temperature": 1.5}, "temperature"),
        ({"temperature": -0.5}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_k": -1}, "top_k"),
    ],
)
async def test_anthropic_bounds_are_a_400_before_anything_is_placed(
    stack: Stack, fields: dict[str, Any], param: str
) -> None:
    request: dict[str, Any] = {"max_tokens": 8, "messages": USER, **fields}
    # The current SDK no longer takes temperature or top_k as arguments; clients still send them.
    sampling = {key: request.pop(key) for key in ("temperature", "top_k") if key in request}
    refusal = await refused(stack, **request, extra_body=sampling)
    assert refusal.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert refusal.body["error"]["message"].startswith(param + ": ")  # type: ignore[index]
    assert stack.upstream.calls == []


async def test_unsupported_server_tool_is_a_clear_400(stack: Stack) -> None:
    refusal = await refused(stack, tools=[{"type": "web_search_20250305", "name": "web_search"}])
    assert "tools[0].type" in refusal.message


async def test_neuron_429_is_a_rate_limit_error_with_retry_after(stack: Stack) -> None:
    stack.upstream.reply = Reply(
        status=429,
        retry_after="7",
        error={"error": {"message": "queue full", "type": "rate_limit_error", "code": "queue_full"}},
    )
    with pytest.raises(anthropic.RateLimitError) as raised:
        await stack.sdk.messages.create(model=MODEL, max_tokens=8, messages=USER)
    assert raised.value.response.headers["retry-after"] == "7"
    assert raised.value.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "queue full"},
        "request_id": raised.value.response.headers["request-id"],
    }
    with pytest.raises(anthropic.RateLimitError):
        async with stack.sdk.messages.stream(model=MODEL, max_tokens=8, messages=USER) as stream:
            await stream.get_final_message()


def neuron_refusal(code: str, message: str, **fields: Any) -> Reply:
    """A neuron's 400 in OpenAI's envelope, with the structured fields it adds."""
    detail = {"message": message, "type": "invalid_request_error", "code": code, **fields}
    return Reply(status=400, error={"error": detail})


VLLM_WORDING = "This model's maximum context length is 8192 tokens. However, you requested ..."


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"prompt_len": 3042, "max_tokens": 32000, "max": 8192},
            "input length and `max_tokens` exceed context limit: 3042 + 32000 > 8192, "
            "decrease input length or `max_tokens` and try again",
        ),
        (
            {"prompt_len": 9000, "max_tokens": 10, "max": 8192},
            "prompt is too long: 9000 tokens > 8192 maximum",
        ),
        ({}, VLLM_WORDING),  # an older neuron without the numbers: its own words, not a guess
    ],
)
async def test_context_overflow_is_worded_as_anthropic_words_it(
    stack: Stack, fields: dict[str, int], expected: str
) -> None:
    stack.upstream.reply = neuron_refusal("context_length_exceeded", VLLM_WORDING, **fields)
    refusal = await refused(stack, max_tokens=8000)
    assert refusal.body["error"] == {"type": "invalid_request_error", "message": expected}  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as streamed:
        async with stack.sdk.messages.stream(model=MODEL, max_tokens=32000, messages=USER) as stream:
            await stream.get_final_message()
    assert streamed.value.body["error"]["message"] == expected  # type: ignore[index]


async def test_refused_fields_are_named_as_the_caller_sent_them(stack: Stack) -> None:
    reason = "this schema cannot be enforced: Unimplemented keys: ['not']"
    stack.upstream.reply = neuron_refusal(
        "unsupported_schema", f"response_format: {reason}", param="response_format"
    )
    refusal = await refused(stack)
    assert refusal.body["error"]["message"] == f"output_config.format: {reason}"  # type: ignore[index]


async def test_neuron_503_is_an_overloaded_error_and_not_repeated(stack: Stack) -> None:
    stack.upstream.reply = Reply(status=503, error={"error": {"message": "draining", "type": "api_error"}})
    with pytest.raises(anthropic.InternalServerError) as raised:
        await stack.sdk.messages.create(model=MODEL, max_tokens=8, messages=USER)
    assert raised.value.status_code == 503
    assert raised.value.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "draining"},
        "request_id": raised.value.response.headers["request-id"],
    }
    assert len(stack.upstream.calls) == 1  # it reached the neuron: never repeated there


async def test_error_mid_stream_raises_in_the_sdk(stack: Stack) -> None:
    stack.upstream.reply = Reply(TEXT, error_frame_after=2)
    with pytest.raises(anthropic.APIStatusError) as raised:
        async with stack.sdk.messages.stream(model=MODEL, max_tokens=8, messages=USER) as stream:
            await stream.get_final_message()
    assert "device fault" in raised.value.message


async def test_unreachable_neuron_is_an_anthropic_shaped_503(stack: Stack) -> None:
    port = stack.upstream.port
    await stack.upstream.__aexit__(None, None, None)  # nothing listens there any more
    response = await stack.http.post("/v1/messages", json={"model": MODEL, "max_tokens": 8, "messages": USER})
    assert response.status_code == 503, port
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == "overloaded_error"
    assert "retry-after" in response.headers


# --- request ids ---------------------------------------------------------------------------


def forwarded_request_id(stack: Stack) -> str | None:
    headers = {name.lower(): value for name, value in stack.upstream.calls[-1].headers.items()}
    return headers.get("x-request-id")


async def test_every_answer_names_its_request_and_the_neuron_gets_the_same_id(stack: Stack) -> None:
    stack.upstream.reply = Reply(TEXT)
    message = await stack.sdk.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=USER)
    request_id = message.headers["request-id"]
    assert request_id.startswith("req_") and message.headers["x-request-id"] == request_id
    assert forwarded_request_id(stack) == request_id
    assert (await message.parse())._request_id == request_id

    refused = await stack.http.post("/v1/messages", json={"model": MODEL, "max_tokens": 0, "messages": USER})
    assert refused.json()["request_id"] == refused.headers["request-id"] != request_id
    for path in ("/v1/models", "/v1/nothing", "/health"):
        answer = await stack.http.get(path)
        assert answer.headers["request-id"] == answer.headers["x-request-id"]


async def test_a_callers_own_request_id_is_kept_end_to_end(stack: Stack) -> None:
    stack.upstream.reply = Reply(TEXT)
    response = await stack.http.post(
        "/v1/messages",
        json={"model": MODEL, "max_tokens": 8, "messages": USER},
        headers={"x-request-id": "trace-42"},
    )
    assert response.headers["request-id"] == response.headers["x-request-id"] == "trace-42"
    assert forwarded_request_id(stack) == "trace-42"


# --- clamp_max_tokens ----------------------------------------------------------------------


async def test_clamp_max_tokens_is_asked_of_the_neuron_only_for_models_that_opt_in() -> None:
    clamped = ModelProfile(id="org/clamped", clamp_max_tokens=True)
    catalogue = ModelCatalogue([ModelProfile(id=MODEL), clamped], {})
    async with ScriptedNeuron(Reply(TEXT, headers={"x-cortex-max-tokens-clamped": "4000"})) as upstream:
        neuron = relaying_neuron(upstream.base_url, MODEL, clamped.id)
        async with gateway([neuron], catalogue) as (_, http):
            asked = {"x-cortex-clamp-max-tokens": "true"}  # a client cannot decide it
            for model in (MODEL, clamped.id):
                body = {"model": model, "max_tokens": 32000, "messages": USER}
                for stream in (False, True):
                    answer = await http.post("/v1/messages", json={**body, "stream": stream}, headers=asked)
                    assert answer.headers["x-cortex-max-tokens-clamped"] == "4000"
                relayed = await http.post(
                    "/v1/chat/completions", json={"model": model, "messages": USER}, headers=asked
                )
                assert relayed.status_code == 200
    sent = [
        {k.lower(): v for k, v in call.headers.items()}.get("x-cortex-clamp-max-tokens")
        for call in upstream.calls
    ]
    assert sent == [None, None, None, "true", "true", "true"]


# --- count_tokens and metrics ---------------------------------------------------------------


async def test_count_tokens_asks_the_neuron_with_the_converted_request(stack: Stack) -> None:
    stack.upstream.count_tokens = 37
    counted = await stack.sdk.messages.count_tokens(
        model=ALIAS, system="Be brief.", messages=USER, tools=TOOLS
    )
    assert counted.input_tokens == 37
    (call,) = stack.upstream.calls
    assert call.path == "/v1/chat/count_tokens"
    assert call.body["model"] == MODEL
    assert call.body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert [t["function"]["name"] for t in call.body["tools"]] == ["get_weather", "get_time"]
    with pytest.raises(anthropic.NotFoundError):
        await stack.sdk.messages.count_tokens(model="org/nope", messages=USER)


async def test_stream_records_ttft_and_tokens(stack: Stack) -> None:
    stack.upstream.reply = Reply(TEXT, prompt_tokens=20, completion_tokens=2)
    await post_stream(stack, {"model": MODEL, "max_tokens": 64, "messages": USER})
    registry = stack.app.state.metrics.registry
    labels = {"model": MODEL, "node": "a"}
    assert registry.get_sample_value("cortex_requests_total", labels) == 1.0
    assert registry.get_sample_value("cortex_time_to_first_token_seconds_count", labels) == 1.0
    assert registry.get_sample_value("cortex_prompt_tokens_total", labels) == 20.0
    assert registry.get_sample_value("cortex_completion_tokens_total", labels) == 2.0
    assert registry.get_sample_value("cortex_requests_in_flight", labels) == 0.0


async def test_a_model_not_yet_loaded_is_cold_loaded_for_messages_and_count_tokens() -> None:
    cold = "org/cold"
    catalogue = ModelCatalogue([ModelProfile(id=MODEL), ModelProfile(id=cold, vram_mb=1_000)], {})
    async with ScriptedNeuron(Reply(TEXT)) as upstream:
        neuron = relaying_neuron(upstream.base_url)
        async with gateway([neuron], catalogue) as (app, http):
            counted = await http.post("/v1/messages/count_tokens", json={"model": cold, "messages": USER})
            answered = await http.post(
                "/v1/messages", json={"model": cold, "max_tokens": 8, "messages": USER}
            )
    assert counted.json() == {"input_tokens": 42}
    assert answered.json()["content"] == [{"type": "text", "text": "Hello, world"}]
    assert [call["model_id"] for call in neuron.load_calls] == [cold]  # loaded once, then resident
    registry = app.state.metrics.registry
    assert registry.get_sample_value("cortex_cold_starts_total", {"model": cold, "node": "a"}) == 1.0


async def test_count_tokens_fails_over_like_the_relay_when_a_replica_is_unreachable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """count_tokens goes through the relay's attempt loop: a replica that refuses the
    connection (tried first: equally busy, named first) is skipped for the next one."""
    async with ScriptedNeuron(Reply(TEXT)) as live:
        live.count_tokens = 37
        dead = FakeNeuron(
            "a", devices_mb=[24_000], endpoint="http://127.0.0.1:1", inference_url="http://127.0.0.1:1"
        )
        alive = FakeNeuron(
            "b", devices_mb=[24_000], endpoint="http://127.0.0.1:2", inference_url=live.base_url
        )
        for neuron in (dead, alive):
            neuron.preload(MODEL, 1_000)
        async with gateway([dead, alive], CATALOGUE) as (_, http):
            counted = await http.post("/v1/messages/count_tokens", json={"model": MODEL, "messages": USER})
            assert counted.status_code == 200, counted.text
            assert counted.json() == {"input_tokens": 37}
            assert [call.path for call in live.calls] == ["/v1/chat/count_tokens"]
    assert any("count_tokens on node a" in record.getMessage() for record in caplog.records)
