"""Anthropic ⇄ OpenAI chat conversion of requests and whole responses (table-driven)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from cortex_core.anthropic.convert import (
    count_tokens_request_to_chat,
    message_from_chat_completion,
    messages_request_to_chat,
    tool_input,
)
from cortex_core.anthropic.messages import CountTokensRequest, MessagesRequest
from cortex_core.errors import ApiError, decode_json_body
from cortex_core.openai.chat import ChatCompletion, ChatCompletionRequest


def _convert(body: dict[str, Any]) -> dict[str, Any]:
    request = msgspec.convert({"model": "m", "max_tokens": 100, **body}, MessagesRequest)
    chat = messages_request_to_chat(request)
    # What the gateway sends upstream must be a valid chat request for the neuron.
    wire = msgspec.json.encode(chat)
    assert decode_json_body(wire, ChatCompletionRequest) == chat
    result: dict[str, Any] = msgspec.json.decode(wire)
    return result


def _user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


REQUEST_CASES = [
    pytest.param(
        {"messages": [_user("hi")]},
        {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]},
        id="minimal",
    ),
    pytest.param(
        {
            "system": [
                {"type": "text", "text": "A", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "B"},
            ],
            "messages": [
                _user("hi"),
                {"role": "system", "content": "late rule"},
                {"role": "system", "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]},
            ],
        },
        {
            "messages": [
                {"role": "system", "content": "A\nB\n\nlate rule\n\nx\ny"},
                {"role": "user", "content": "hi"},
            ]
        },
        id="one-system-message-first",
    ),
    pytest.param(
        {
            "messages": [
                _user(
                    [
                        {"type": "text", "text": "what"},
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/jpeg", "data": "QUJD"},
                        },
                        {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}},
                    ]
                )
            ]
        },
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what"},
                        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,QUJD"}},
                        {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                    ],
                }
            ]
        },
        id="images",
    ),
    pytest.param(
        {"messages": [_user([{"type": "text", "text": "<reminder>"}, {"type": "text", "text": "do it"}])]},
        {"messages": [{"role": "user", "content": "<reminder>\ndo it"}]},
        id="text-blocks-join",
    ),
    pytest.param(
        {
            "messages": [
                _user("weather?"),
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "need tool", "signature": "s"},
                        {"type": "redacted_thinking", "data": "zzz"},
                        {"type": "text", "text": "Checking."},
                        {
                            "type": "tool_use",
                            "id": "toolu_1",
                            "name": "wx",
                            "input": {"city": "Paris", "n": 1},
                        },
                        {"type": "tool_use", "id": "toolu_2", "name": "time", "input": {}},
                    ],
                },
                _user(
                    [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "21C"},
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_2",
                            "content": [{"type": "text", "text": "no"}, {"type": "text", "text": "clock"}],
                            "is_error": True,
                        },
                        {"type": "text", "text": "thanks"},
                    ]
                ),
                _user([{"type": "tool_result", "tool_use_id": "toolu_3"}]),
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": "Checking.",
                    "reasoning_content": "need tool",
                    "tool_calls": [
                        {
                            "id": "toolu_1",
                            "type": "function",
                            "function": {"name": "wx", "arguments": '{"city":"Paris","n":1}'},
                        },
                        {
                            "id": "toolu_2",
                            "type": "function",
                            "function": {"name": "time", "arguments": "{}"},
                        },
                    ],
                },
                {"role": "tool", "content": "21C", "tool_call_id": "toolu_1"},
                {"role": "tool", "content": "Error: no\nclock", "tool_call_id": "toolu_2"},
                {"role": "user", "content": "thanks"},
                {"role": "tool", "content": "", "tool_call_id": "toolu_3"},
            ]
        },
        id="tool-round-trip-and-thinking-history",
    ),
    pytest.param(
        {
            "messages": [
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}
            ]
        },
        {
            "messages": [
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"id": "t", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                    ],
                }
            ]
        },
        id="tool-only-turn-has-empty-content",
    ),
    pytest.param(
        {
            "messages": [_user("x")],
            "tools": [
                {"name": "wx", "description": "weather", "input_schema": {"type": "object"}},
                {
                    "name": "t2",
                    "input_schema": {"type": "object", "properties": {}},
                    "type": "custom",
                    "strict": True,
                },
            ],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        },
        {
            "tools": [
                {
                    "type": "function",
                    "function": {"name": "wx", "description": "weather", "parameters": {"type": "object"}},
                },
                {
                    "type": "function",
                    "function": {
                        "name": "t2",
                        "parameters": {"type": "object", "properties": {}},
                        "strict": True,
                    },
                },
            ],
            "tool_choice": "required",
            "parallel_tool_calls": False,
        },
        id="tools-any",
    ),
    pytest.param(
        {"messages": [_user("x")], "tool_choice": {"type": "auto"}},
        {"tool_choice": "auto"},
        id="tool-choice-auto",
    ),
    pytest.param(
        {"messages": [_user("x")], "tool_choice": {"type": "none"}},
        {"tool_choice": "none"},
        id="tool-choice-none",
    ),
    pytest.param(
        {"messages": [_user("x")], "tool_choice": {"type": "tool", "name": "wx"}},
        {"tool_choice": {"type": "function", "function": {"name": "wx"}}},
        id="tool-choice-named",
    ),
    pytest.param(
        {
            "messages": [_user("x")],
            "stop_sequences": ["</a>", "STOP"],
            "temperature": 0.3,
            "top_p": 0.9,
            "top_k": 20,
            "stream": True,
            "metadata": {"user_id": "u"},
            "thinking": {"type": "enabled", "budget_tokens": 256},
        },
        {
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "temperature": 0.3,
            "top_p": 0.9,
            "top_k": 20,
            "stop": ["</a>", "STOP"],
            "chat_template_kwargs": {"enable_thinking": True, "thinking_budget": 256},
        },
        id="sampling-stream-thinking-enabled",
    ),
    pytest.param(
        {"messages": [_user("x")], "thinking": {"type": "disabled"}, "stop_sequences": []},
        {"chat_template_kwargs": {"enable_thinking": False}},
        id="thinking-disabled",
    ),
    pytest.param(
        {"messages": [_user("x")], "thinking": {"type": "adaptive"}},
        {"chat_template_kwargs": {"enable_thinking": True}},
        id="thinking-adaptive",
    ),
    pytest.param(
        {
            "messages": [_user("x")],
            "output_config": {
                "effort": "low",
                "format": {"type": "json_schema", "schema": {"type": "object"}},
            },
        },
        {
            "reasoning_effort": "low",
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": {"type": "object"}},
            },
        },
        id="output-config",
    ),
    pytest.param(
        {"messages": [_user("x"), {"role": "assistant", "content": "The answer is"}]},
        {
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": "The answer is"},
            ],
            "continue_final_message": True,
            "add_generation_prompt": False,
        },
        id="assistant-prefill",
    ),
]


@pytest.mark.parametrize(("body", "expected"), REQUEST_CASES)
def test_request_to_chat(body: dict[str, Any], expected: dict[str, Any]) -> None:
    converted = _convert(body)
    for key, value in expected.items():
        assert converted.get(key) == value, key
    assert "metadata" not in converted
    if body["messages"][-1]["role"] != "assistant":
        assert "continue_final_message" not in converted


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        pytest.param(
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": [{"type": "image", "source": {"type": "url", "url": "u"}}],
                    }
                ]
            },
            "messages[0].content[0]",
            "`image` block is not valid in an assistant message",
            id="image-in-assistant",
        ),
        pytest.param(
            {"messages": [_user([{"type": "tool_use", "id": "t", "name": "f", "input": {}}])]},
            "messages[0].content[0]",
            "only valid in an assistant message",
            id="tool-use-in-user",
        ),
        pytest.param(
            {"messages": [_user([{"type": "thinking", "thinking": "x"}])]},
            "messages[0].content[0]",
            "`thinking` block",
            id="thinking-in-user",
        ),
        pytest.param(
            {
                "messages": [
                    _user(
                        [
                            {"type": "text", "text": "ok"},
                            {
                                "type": "tool_result",
                                "tool_use_id": "t",
                                "content": [{"type": "image", "source": {"type": "url", "url": "u"}}],
                            },
                        ]
                    )
                ]
            },
            "messages[0].content[1].content[0]",
            "images inside tool_result",
            id="image-in-tool-result",
        ),
        pytest.param(
            {
                "messages": [
                    {"role": "system", "content": [{"type": "image", "source": {"type": "url", "url": "u"}}]}
                ]
            },
            "messages[0].content[0]",
            "only hold text blocks",
            id="image-in-system",
        ),
        pytest.param(
            {"messages": [_user("x")], "tools": [{"name": "web_search", "type": "web_search_20250305"}]},
            "tools[0].type",
            "web_search_20250305",
            id="server-tool",
        ),
        pytest.param(
            {"messages": [_user("x")], "tools": [{"name": "f"}]},
            "tools[0].input_schema",
            "is required",
            id="tool-without-schema",
        ),
    ],
)
def test_unsupported_request_content_is_a_400_naming_the_field(
    body: dict[str, Any], param: str, fragment: str
) -> None:
    with pytest.raises(ApiError) as err:
        _convert(body)
    assert err.value.status == 400
    assert err.value.type == "invalid_request_error"
    assert err.value.param == param
    assert fragment in err.value.message
    assert err.value.anthropic_body()["error"]["type"] == "invalid_request_error"


# Anthropic's own bounds (issue #18): refused as the Messages API refuses them, naming the field.
OUT_OF_BOUNDS = [
    pytest.param({"messages": []}, "messages", "at least one message", id="no-messages"),
    pytest.param({"max_tokens": 0}, "max_tokens", "at least 1, got 0", id="max-tokens-0"),
    pytest.param({"max_tokens": -5}, "max_tokens", "got -5", id="max-tokens-negative"),
    pytest.param({"temperature": 1.5}, "temperature", "between 0 and 1, got 1.5", id="temperature-above-1"),
    pytest.param({"temperature": -0.1}, "temperature", "got -0.1", id="temperature-negative"),
    pytest.param({"top_p": 1.2}, "top_p", "between 0 and 1", id="top-p-above-1"),
    pytest.param({"top_k": -1}, "top_k", "0 or more, got -1", id="top-k-negative"),
]


@pytest.mark.parametrize(("fields", "param", "fragment"), OUT_OF_BOUNDS)
def test_values_outside_anthropics_bounds_are_a_400_naming_the_field(
    fields: dict[str, Any], param: str, fragment: str
) -> None:
    with pytest.raises(ApiError) as err:
        _convert({"messages": [_user("x")], **fields})
    assert (err.value.status, err.value.param) == (400, param)
    assert err.value.message.startswith(param + ": ") and fragment in err.value.message


@pytest.mark.parametrize("fields", [{"temperature": 0}, {"temperature": 1}, {"top_k": 0}, {"max_tokens": 1}])
def test_the_bounds_themselves_are_accepted(fields: dict[str, Any]) -> None:
    assert _convert({"messages": [_user("x")], **fields})["messages"]


def test_count_tokens_without_messages_is_a_400() -> None:
    with pytest.raises(ApiError) as err:
        count_tokens_request_to_chat(msgspec.convert({"model": "m", "messages": []}, CountTokensRequest))
    assert err.value.param == "messages"


def test_count_tokens_request_keeps_the_prompt_only() -> None:
    request = msgspec.convert(
        {"model": "m", "system": "s", "messages": [_user("x")], "tools": [{"name": "f", "input_schema": {}}]},
        CountTokensRequest,
    )
    chat = msgspec.to_builtins(count_tokens_request_to_chat(request))
    assert chat["messages"] == [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}]
    assert chat["tools"][0]["function"]["name"] == "f"
    assert "max_tokens" not in chat


def _completion(message: dict[str, Any], finish_reason: str | None, **choice: Any) -> ChatCompletion:
    return msgspec.convert(
        {
            "id": "chatcmpl-1",
            "created": 1,
            "model": "qwen3-8b",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", **message},
                    "finish_reason": finish_reason,
                    **choice,
                }
            ],
            "usage": {
                "prompt_tokens": 50,
                "completion_tokens": 7,
                "total_tokens": 57,
                "prompt_tokens_details": {"cached_tokens": 32},
            },
        },
        ChatCompletion,
    )


RESPONSE_CASES = [
    pytest.param(
        _completion({"content": "Hello."}, "stop"),
        [{"type": "text", "text": "Hello."}],
        ("end_turn", None),
        id="text",
    ),
    pytest.param(
        _completion({"content": "Hi", "reasoning_content": "think", "reasoning": "think"}, "stop"),
        [{"type": "thinking", "thinking": "think", "signature": ""}, {"type": "text", "text": "Hi"}],
        ("end_turn", None),
        id="reasoning-once-although-in-both-fields",
    ),
    pytest.param(
        _completion({"content": None, "reasoning": "r"}, "length"),
        [{"type": "thinking", "thinking": "r", "signature": ""}],
        ("max_tokens", None),
        id="reasoning-field-and-length",
    ),
    pytest.param(
        _completion({"content": "The answer", "tool_calls": []}, "stop", stop_reason="</answer>"),
        [{"type": "text", "text": "The answer"}],
        ("stop_sequence", "</answer>"),
        id="matched-stop-sequence",
    ),
    pytest.param(
        _completion({"content": "x"}, "stop", stop_reason=151645),
        [{"type": "text", "text": "x"}],
        ("end_turn", None),
        id="stop-token-is-end-turn",
    ),
    pytest.param(
        _completion(
            {
                "content": "Let me look.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "wx", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "bad", "arguments": "{city: Paris"},
                    },
                    {"id": "call_3", "type": "function", "function": {"name": "empty", "arguments": ""}},
                ],
            },
            "tool_calls",
        ),
        [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "call_1", "name": "wx", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "bad", "input": {"_raw": "{city: Paris"}},
            {"type": "tool_use", "id": "call_3", "name": "empty", "input": {}},
        ],
        ("tool_use", None),
        id="tool-calls",
    ),
    pytest.param(
        _completion(
            {
                "content": "",
                "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
            "stop",
        ),
        [{"type": "tool_use", "id": "c", "name": "f", "input": {}}],
        ("tool_use", None),
        id="tool-calls-with-finish-stop",
    ),
    pytest.param(
        _completion({"content": "no"}, "content_filter"),
        [{"type": "text", "text": "no"}],
        ("refusal", None),
        id="content-filter",
    ),
]


@pytest.mark.parametrize(("completion", "content", "stop"), RESPONSE_CASES)
def test_chat_completion_to_message(
    completion: ChatCompletion, content: list[dict[str, Any]], stop: tuple[str, str | None]
) -> None:
    message = msgspec.to_builtins(message_from_chat_completion(completion))
    assert message["content"] == content
    assert (message["stop_reason"], message["stop_sequence"]) == stop
    assert message["id"] == "msg_chatcmpl-1"
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["model"] == "qwen3-8b"
    assert message["usage"] == {
        "input_tokens": 18,
        "output_tokens": 7,
        "cache_read_input_tokens": 32,
        "cache_creation_input_tokens": 0,
    }


def test_message_without_choices_or_usage() -> None:
    message = message_from_chat_completion(ChatCompletion(id="msg_x", model="m"), model="alias")
    assert msgspec.to_builtins(message) == {
        "id": "msg_x",
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": "alias",
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 0,
            "output_tokens": 0,
            "cache_creation_input_tokens": None,
            "cache_read_input_tokens": None,
        },
    }


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ('{"a": 1}', {"a": 1}),
        ("  ", {}),
        ("[1, 2]", {"_raw": "[1, 2]"}),
        ('"text"', {"_raw": '"text"'}),
        ('{"a": ', {"_raw": '{"a": '}),
    ],
)
def test_tool_input(arguments: str, expected: dict[str, Any]) -> None:
    assert tool_input(arguments) == expected


async def test_anthropic_sdk_parses_the_converted_message() -> None:
    """The official SDK accepts what we produce (a real client's view of the JSON)."""
    import anthropic
    import httpx2

    completion = RESPONSE_CASES[5].values[0]
    body = msgspec.json.encode(message_from_chat_completion(completion))  # type: ignore[arg-type]

    def handler(_: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=body, headers={"content-type": "application/json"})

    async with httpx2.AsyncClient(transport=httpx2.MockTransport(handler)) as http:
        client = anthropic.AsyncAnthropic(api_key="k", base_url="http://test", http_client=http)
        message = await client.messages.create(
            model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    assert message.stop_reason == "tool_use"
    assert [block.type for block in message.content] == ["text", "tool_use", "tool_use", "tool_use"]
    assert message.usage.cache_read_input_tokens == 32
