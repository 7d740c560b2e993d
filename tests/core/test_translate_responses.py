"""Responses API ⇄ chat: request and response conversion, and the stream converter's transcripts.

The stream tests also play the encoded SSE to the official OpenAI SDK, whose stream helper
must rebuild the same final Response.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from cortex_core.errors import ApiError, decode_json_body
from cortex_core.openai.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest
from cortex_core.openai.responses import ResponsesRequest, ResponseStreamEvent
from cortex_core.openai.responses_convert import response_from_chat_completion, responses_request_to_chat
from cortex_core.openai.responses_stream import ResponsesStreamConverter
from cortex_core.sse import encode_event


def _request(**body: Any) -> ResponsesRequest:
    return msgspec.convert({"model": "m", **body}, ResponsesRequest)


def _chat(**body: Any) -> dict[str, Any]:
    chat = responses_request_to_chat(_request(**body))
    wire = msgspec.json.encode(chat)
    assert decode_json_body(wire, ChatCompletionRequest) == chat  # a valid chat request on the wire
    result: dict[str, Any] = msgspec.json.decode(wire)
    return result


FN = {"type": "function", "name": "wx", "description": "weather", "parameters": {"type": "object"}}

REQUEST_CASES = [
    pytest.param(
        {
            "input": "hi",
            "instructions": "be brief",
            "max_output_tokens": 50,
            "temperature": 0.1,
            "top_p": 0.5,
        },
        {
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            "max_tokens": 50,
            "temperature": 0.1,
            "top_p": 0.5,
        },
        id="string-input",
    ),
    pytest.param(
        {
            "input": [
                {"role": "developer", "content": "rules"},
                {"role": "user", "content": None},
                {
                    "type": "message",
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "look"},
                        {"type": "input_image", "image_url": "https://x/i.png", "detail": "high"},
                    ],
                },
                {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}],
                },
            ]
        },
        {
            "messages": [
                {"role": "developer", "content": "rules"},
                {"role": "user", "content": ""},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "look"},
                        {"type": "image_url", "image_url": {"url": "https://x/i.png", "detail": "high"}},
                    ],
                },
                {"role": "user", "content": "a\n\nb"},
            ]
        },
        id="messages-and-parts",
    ),
    pytest.param(
        {
            "input": [
                {"role": "user", "content": "weather in Paris and Oslo?"},
                {
                    "type": "reasoning",
                    "id": "rs_1",
                    "summary": [],
                    "content": [{"type": "reasoning_text", "text": "two calls"}],
                },
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "Checking."}],
                },
                {"type": "function_call", "call_id": "c1", "name": "wx", "arguments": '{"city":"Paris"}'},
                {"type": "function_call", "call_id": "c2", "name": "wx", "arguments": '{"city":"Oslo"}'},
                {"type": "function_call_output", "call_id": "c1", "output": "21C"},
                {
                    "type": "function_call_output",
                    "call_id": "c2",
                    "output": [{"type": "input_text", "text": "3C"}],
                },
                {
                    "type": "reasoning",
                    "id": "rs_2",
                    "summary": [{"type": "summary_text", "text": "one more"}],
                },
                {"type": "function_call", "call_id": "c3", "name": "wx", "arguments": "{}"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "weather in Paris and Oslo?"},
                {
                    "role": "assistant",
                    "content": "Checking.",
                    "reasoning_content": "two calls",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "wx", "arguments": '{"city":"Paris"}'},
                        },
                        {
                            "id": "c2",
                            "type": "function",
                            "function": {"name": "wx", "arguments": '{"city":"Oslo"}'},
                        },
                    ],
                },
                {"role": "tool", "content": "21C", "tool_call_id": "c1"},
                {"role": "tool", "content": "3C", "tool_call_id": "c2"},
                {
                    "role": "assistant",
                    "content": "",
                    "reasoning_content": "one more",
                    "tool_calls": [
                        {"id": "c3", "type": "function", "function": {"name": "wx", "arguments": "{}"}}
                    ],
                },
            ]
        },
        id="function-calls-merge-and-reasoning-history",
    ),
    pytest.param(
        {
            "input": "x",
            "tools": [
                FN,
                {"type": "web_search"},
                {"type": "function", "function": {"name": "old", "parameters": {"type": "object"}}},
            ],
            "tool_choice": {"type": "function", "name": "wx"},
            "parallel_tool_calls": False,
            "reasoning": {"effort": "high"},
            "text": {
                "format": {"type": "json_schema", "name": "o", "schema": {"type": "object"}, "strict": True}
            },
            "stream": True,
            "top_logprobs": 3,
        },
        {
            "tools": [
                {
                    "type": "function",
                    "function": {"name": "wx", "description": "weather", "parameters": {"type": "object"}},
                },
                {"type": "function", "function": {"name": "old", "parameters": {"type": "object"}}},
            ],
            "tool_choice": {"type": "function", "function": {"name": "wx"}},
            "parallel_tool_calls": False,
            "reasoning_effort": "high",
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "o", "schema": {"type": "object"}, "strict": True},
            },
            "stream": True,
            "stream_options": {"include_usage": True},
            "logprobs": True,
            "top_logprobs": 3,
        },
        id="tools-format-stream",
    ),
    pytest.param(
        {"input": "x", "tool_choice": "required", "text": {"format": {"type": "json_object"}}},
        {"tool_choice": "required", "response_format": {"type": "json_object"}},
        id="tool-choice-required-json-object",
    ),
]


@pytest.mark.parametrize(("body", "expected"), REQUEST_CASES)
def test_request_to_chat(body: dict[str, Any], expected: dict[str, Any]) -> None:
    converted = _chat(**body)
    for key, value in expected.items():
        assert converted.get(key) == value, key


@pytest.mark.parametrize(
    ("body", "param"),
    [
        pytest.param(
            {"input": "x", "previous_response_id": "resp_1"}, "previous_response_id", id="previous-response"
        ),
        pytest.param({"input": [{"type": "web_search_call", "id": "w"}]}, "input[0].type", id="unknown-item"),
        pytest.param(
            {"input": [{"type": "message", "content": "x"}]}, "input[0].role", id="message-without-role"
        ),
        pytest.param(
            {"input": [{"type": "function_call", "name": "f"}]}, "input[0].call_id", id="call-without-id"
        ),
        pytest.param(
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]},
            "input[0].content[0].file_id",
            id="image-file-id",
        ),
        pytest.param(
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input[0].content[0].type",
            id="input-file",
        ),
        pytest.param(
            {"input": [{"role": "system", "content": [{"type": "input_image", "image_url": "u"}]}]},
            "input[0].content",
            id="image-in-system",
        ),
        pytest.param(
            {"input": "x", "tool_choice": {"type": "web_search"}}, "tool_choice", id="hosted-tool-choice"
        ),
    ],
)
def test_unsupported_requests_are_400_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as err:
        _chat(**body)
    assert err.value.status == 400
    assert err.value.param == param


def _completion(message: dict[str, Any], finish_reason: str) -> ChatCompletion:
    return msgspec.convert(
        {
            "id": "c",
            "model": "m",
            "choices": [
                {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish_reason}
            ],
            "usage": {
                "prompt_tokens": 10,
                "completion_tokens": 5,
                "total_tokens": 15,
                "prompt_tokens_details": {"cached_tokens": 4},
                "completion_tokens_details": {"reasoning_tokens": 2},
            },
        },
        ChatCompletion,
    )


def test_response_from_chat_completion_with_reasoning_text_and_calls() -> None:
    completion = _completion(
        {
            "content": "Checking.",
            "reasoning_content": "hmm",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "wx", "arguments": "{}"}}
            ],
        },
        "tool_calls",
    )
    request = _request(input="x", tools=[FN], instructions="sys", temperature=0.2)
    response = msgspec.to_builtins(
        response_from_chat_completion(completion, request, response_id="resp_abc", created_at=7)
    )
    assert response["output"] == [
        {
            "type": "reasoning",
            "id": "rs_abc",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": "hmm"}],
            "status": "completed",
        },
        {
            "type": "message",
            "id": "msg_abc",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": "Checking.", "annotations": []}],
        },
        {
            "type": "function_call",
            "id": "fc_abc_0",
            "call_id": "call_1",
            "name": "wx",
            "arguments": "{}",
            "status": "completed",
        },
    ]
    assert response["status"] == "completed" and response["incomplete_details"] is None
    assert response["usage"] == {
        "input_tokens": 10,
        "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
        "output_tokens": 5,
        "output_tokens_details": {"reasoning_tokens": 2},
        "total_tokens": 15,
    }
    assert (response["id"], response["object"], response["created_at"], response["model"]) == (
        "resp_abc",
        "response",
        7,
        "m",
    )
    assert (response["instructions"], response["temperature"]) == ("sys", 0.2)
    assert response["tools"] == [
        {
            "type": "function",
            "name": "wx",
            "description": "weather",
            "parameters": {"type": "object"},
            "strict": None,
        }
    ]


def test_response_hitting_the_token_limit_is_incomplete() -> None:
    response = response_from_chat_completion(
        _completion({"content": "abc"}, "length"), _request(input="x"), response_id="resp_1", created_at=1
    )
    assert response.status == "incomplete"
    assert (
        response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    )
    assert msgspec.to_builtins(response.output)[0]["status"] == "incomplete"


# --- stream ---------------------------------------------------------------------------------


def chunk(
    delta: dict[str, Any] | None = None, finish: str | None = None, usage: dict[str, Any] | None = None
) -> ChatCompletionChunk:
    body: dict[str, Any] = {"id": "c", "model": "m", "choices": []}
    if delta is not None or finish is not None:
        body["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish}]
    if usage is not None:
        body["usage"] = usage
    return msgspec.convert(body, ChatCompletionChunk)


USAGE = {"prompt_tokens": 10, "completion_tokens": 6, "total_tokens": 16}


def summary(event: ResponseStreamEvent) -> str:
    data = msgspec.to_builtins(event)
    kind = data["type"].removeprefix("response.")
    if "item" in data:
        item = data["item"]
        return f"{kind} {data['output_index']} {item['type']} {item['id']} {item.get('status')}"
    if "delta" in data:
        return f"{kind} {data['item_id']} {data['delta']!r}"
    if "part" in data:
        return f"{kind} {data['item_id']} {data['part']['type']} {data['part'].get('text')!r}"
    if "text" in data:
        return f"{kind} {data['item_id']} {data['text']!r}"
    if "arguments" in data:
        return f"{kind} {data['item_id']} {data['arguments']}"
    if "response" in data:
        response = data["response"]
        return f"{kind} {response['status']} outputs={len(response['output'])} usage={(response['usage'] or {}).get('total_tokens')}"
    return str(kind)


def run(
    chunks: list[ChatCompletionChunk], *, error: str | None = None
) -> tuple[list[str], list[ResponseStreamEvent]]:
    converter = ResponsesStreamConverter(_request(input="x", stream=True), response_id="resp_1", created_at=1)
    events: list[ResponseStreamEvent] = []
    for item in chunks:
        events += converter.feed(item)
    events += converter.fail(error) if error else converter.finish()
    assert converter.finish() == []
    assert [event.sequence_number for event in events] == list(range(len(events)))
    return [summary(event) for event in events], events


START = ["created in_progress outputs=0 usage=None", "in_progress in_progress outputs=0 usage=None"]

GOLDEN = [
    pytest.param(
        [
            chunk({"role": "assistant", "content": ""}),
            chunk({"content": "Hel"}),
            chunk({"content": "lo"}),
            chunk({}, "stop"),
            chunk(usage=USAGE),
        ],
        [
            *START,
            "output_item.added 0 message msg_1 in_progress",
            "content_part.added msg_1 output_text ''",
            "output_text.delta msg_1 'Hel'",
            "output_text.delta msg_1 'lo'",
            "output_text.done msg_1 'Hello'",
            "content_part.done msg_1 output_text 'Hello'",
            "output_item.done 0 message msg_1 completed",
            "completed completed outputs=1 usage=16",
        ],
        id="text",
    ),
    pytest.param(
        [
            chunk({"reasoning_content": "think", "reasoning": "think"}),
            chunk({"reasoning": "ing"}),
            chunk({"content": "Checking."}),
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_a",
                            "type": "function",
                            "function": {"name": "wx", "arguments": '{"city":'},
                        }
                    ]
                }
            ),
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": 1,
                            "id": "call_b",
                            "type": "function",
                            "function": {"name": "tz", "arguments": "{}"},
                        }
                    ]
                }
            ),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}),
            chunk({}, "tool_calls", usage=USAGE),
        ],
        [
            *START,
            "output_item.added 0 reasoning rs_1 in_progress",
            "content_part.added rs_1 reasoning_text ''",
            "reasoning_text.delta rs_1 'think'",
            "reasoning_text.delta rs_1 'ing'",
            "reasoning_text.done rs_1 'thinking'",
            "content_part.done rs_1 reasoning_text 'thinking'",
            "output_item.done 0 reasoning rs_1 completed",
            "output_item.added 1 message msg_1 in_progress",
            "content_part.added msg_1 output_text ''",
            "output_text.delta msg_1 'Checking.'",
            "output_text.done msg_1 'Checking.'",
            "content_part.done msg_1 output_text 'Checking.'",
            "output_item.done 1 message msg_1 completed",
            "output_item.added 2 function_call fc_1_0 in_progress",
            "function_call_arguments.delta fc_1_0 '{\"city\":'",
            "output_item.added 3 function_call fc_1_1 in_progress",
            "function_call_arguments.delta fc_1_1 '{}'",
            "function_call_arguments.delta fc_1_0 '\"Oslo\"}'",
            'function_call_arguments.done fc_1_0 {"city":"Oslo"}',
            "output_item.done 2 function_call fc_1_0 completed",
            "function_call_arguments.done fc_1_1 {}",
            "output_item.done 3 function_call fc_1_1 completed",
            "completed completed outputs=4 usage=16",
        ],
        id="reasoning-text-parallel-calls",
    ),
    pytest.param(
        [chunk({"content": "abc"}), chunk({}, "length")],
        [
            *START,
            "output_item.added 0 message msg_1 in_progress",
            "content_part.added msg_1 output_text ''",
            "output_text.delta msg_1 'abc'",
            "output_text.done msg_1 'abc'",
            "content_part.done msg_1 output_text 'abc'",
            "output_item.done 0 message msg_1 incomplete",
            "incomplete incomplete outputs=1 usage=None",
        ],
        id="length-is-incomplete",
    ),
    pytest.param(
        [chunk({"role": "assistant"}), chunk({}, "stop")],
        [
            *START,
            "output_item.added 0 message msg_1 in_progress",
            "content_part.added msg_1 output_text ''",
            "output_text.done msg_1 ''",
            "content_part.done msg_1 output_text ''",
            "output_item.done 0 message msg_1 completed",
            "completed completed outputs=1 usage=None",
        ],
        id="empty-reply-still-has-a-message",
    ),
]


@pytest.mark.parametrize(("chunks", "expected"), GOLDEN)
def test_golden_stream_transcripts(chunks: list[ChatCompletionChunk], expected: list[str]) -> None:
    assert run(chunks)[0] == expected


def test_failure_mid_stream() -> None:
    lines, events = run([chunk({"content": "par"})], error="engine crashed")
    assert lines[-1] == "failed failed outputs=0 usage=None"
    failed = msgspec.to_builtins(events[-1])
    assert failed["response"]["error"] == {"code": "server_error", "message": "engine crashed"}


async def test_openai_sdk_rebuilds_the_response_from_our_sse() -> None:
    import httpx2
    import openai

    _, events = run(GOLDEN[1].values[0])  # type: ignore[arg-type]
    body = b"".join(encode_event(event) for event in events)

    def handler(_: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=body, headers={"content-type": "text/event-stream"})

    async with httpx2.AsyncClient(transport=httpx2.MockTransport(handler)) as http:
        client = openai.AsyncOpenAI(api_key="k", base_url="http://test/v1", http_client=http)
        async with client.responses.stream(model="m", input="x") as stream:
            kinds = [event.type async for event in stream]
            final = await stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert final.output_text == "Checking."
    assert [item.type for item in final.output] == ["reasoning", "message", "function_call", "function_call"]
    assert [(item.call_id, item.arguments) for item in final.output[2:]] == [
        ("call_a", '{"city":"Oslo"}'),
        ("call_b", "{}"),
    ]  # type: ignore[union-attr]
    assert final.usage is not None and final.usage.total_tokens == 16
