"""Golden transcripts of the OpenAI-chunk → Anthropic-event stream converter.

Each upstream shape is a list of chunks; the converter's events are summarised one line each
(type and the fields that matter) and compared exactly. The last test plays the encoded SSE
to the official Anthropic SDK, which must rebuild the same message.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from cortex_core.anthropic.messages import (
    ContentBlockDeltaEvent,
    ContentBlockStartEvent,
    ContentBlockStopEvent,
    ErrorEvent,
    InputJSONDelta,
    MessageDeltaEvent,
    MessageStartEvent,
    MessageStreamEvent,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    ToolUseBlock,
)
from cortex_core.anthropic.stream import AnthropicStreamConverter
from cortex_core.openai.chat import ChatCompletionChunk
from cortex_core.sse import encode_event


def chunk(
    delta: dict[str, Any] | None = None,
    finish: str | None = None,
    usage: dict[str, Any] | None = None,
    **choice: Any,
) -> ChatCompletionChunk:
    body: dict[str, Any] = {"id": "chatcmpl-9", "created": 1, "model": "qwen3", "choices": []}
    if delta is not None or finish is not None:
        body["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish, **choice}]
    if usage is not None:
        body["usage"] = usage
    return msgspec.convert(body, ChatCompletionChunk)


def tool(
    index: int, *, id: str | None = None, name: str | None = None, args: str | None = None
) -> dict[str, Any]:
    call: dict[str, Any] = {"index": index}
    if id is not None:
        call["id"] = id
        call["type"] = "function"
    function = {}
    if name is not None:
        function["name"] = name
    if args is not None:
        function["arguments"] = args
    call["function"] = function
    return call


USAGE = {
    "prompt_tokens": 20,
    "completion_tokens": 9,
    "total_tokens": 29,
    "prompt_tokens_details": {"cached_tokens": 16},
}
ROLE = chunk({"role": "assistant", "content": ""})


def summary(event: MessageStreamEvent) -> str:
    if isinstance(event, MessageStartEvent):
        usage = event.message.usage
        return f"message_start {event.message.id} {event.message.model} in={usage.input_tokens} cached={usage.cache_read_input_tokens}"
    if isinstance(event, ContentBlockStartEvent):
        block = event.content_block
        if isinstance(block, ToolUseBlock):
            return f"start {event.index} tool_use {block.id} {block.name}"
        assert isinstance(block, TextBlock | ThinkingBlock)
        return f"start {event.index} {block.__struct_config__.tag}"
    if isinstance(event, ContentBlockDeltaEvent):
        delta = event.delta
        if isinstance(delta, TextDelta):
            return f"delta {event.index} text {delta.text!r}"
        if isinstance(delta, ThinkingDelta):
            return f"delta {event.index} thinking {delta.thinking!r}"
        assert isinstance(delta, InputJSONDelta)
        return f"delta {event.index} json {delta.partial_json}"
    if isinstance(event, ContentBlockStopEvent):
        return f"stop {event.index}"
    if isinstance(event, MessageDeltaEvent):
        usage = msgspec.to_builtins(event.usage)
        return f"message_delta {event.delta.stop_reason} {event.delta.stop_sequence} {usage}"
    if isinstance(event, ErrorEvent):
        return f"error {event.error.type} {event.error.message}"
    return str(event.__struct_config__.tag)


def run(chunks: list[ChatCompletionChunk], *, error: str | None = None) -> list[str]:
    converter = AnthropicStreamConverter()
    events: list[MessageStreamEvent] = []
    for item in chunks:
        events += converter.feed(item)
    events += converter.fail(error) if error else converter.finish()
    assert converter.finish() == [] and converter.fail("again") == []  # closed for good
    return [summary(event) for event in events]


START = ["message_start msg_chatcmpl-9 qwen3 in=0 cached=None", "ping"]
FULL_USAGE = (
    "{'output_tokens': 9, 'input_tokens': 4, 'cache_creation_input_tokens': 0, 'cache_read_input_tokens': 16}"
)

GOLDEN = [
    pytest.param(
        [ROLE, chunk({"content": "Hel"}), chunk({"content": "lo"}), chunk({}, "stop")],
        [
            *START,
            "start 0 text",
            "delta 0 text 'Hel'",
            "delta 0 text 'lo'",
            "stop 0",
            "message_delta end_turn None {'output_tokens': 2}",
            "message_stop",
        ],
        id="text",
    ),
    pytest.param(
        [
            ROLE,
            chunk({"reasoning_content": "Let me", "reasoning": "Let me"}),
            chunk({"reasoning": " think"}),
            chunk({"content": "Yes."}),
            chunk({}, "stop"),
            chunk(usage=USAGE),
        ],
        [
            *START,
            "start 0 thinking",
            "delta 0 thinking 'Let me'",
            "delta 0 thinking ' think'",
            "stop 0",
            "start 1 text",
            "delta 1 text 'Yes.'",
            "stop 1",
            f"message_delta end_turn None {FULL_USAGE}",
            "message_stop",
        ],
        id="reasoning-then-text-usage-in-last-chunk",
    ),
    pytest.param(
        [
            ROLE,
            chunk({"content": "Checking."}),
            chunk({"tool_calls": [tool(0, id="call_1", name="wx", args="")]}),
            chunk({"tool_calls": [tool(0, args='{"city": ')]}),
            chunk({"tool_calls": [tool(0, args='"Paris"}')]}),
            chunk({}, "tool_calls"),
        ],
        [
            *START,
            "start 0 text",
            "delta 0 text 'Checking.'",
            "stop 0",
            "start 1 tool_use call_1 wx",
            'delta 1 json {"city":"Paris"}',
            "stop 1",
            "message_delta tool_use None {'output_tokens': 3}",
            "message_stop",
        ],
        id="text-then-tool-call",
    ),
    pytest.param(
        [
            ROLE,
            chunk({"tool_calls": [tool(0, id="call_a", name="wx", args='{"city":"Paris"}')]}),
            chunk({"tool_calls": [tool(1, id="call_b", name="wx", args='{"city":')]}),
            # A late fragment for the first call, then the rest of the second: nothing is lost.
            chunk({"tool_calls": [tool(0, args="")]}),
            chunk({"tool_calls": [tool(1, args='"Oslo"}')]}),
            chunk({}, "tool_calls", usage=USAGE),
        ],
        [
            *START,
            "start 0 tool_use call_a wx",
            'delta 0 json {"city":"Paris"}',
            "stop 0",
            "start 1 tool_use call_b wx",
            'delta 1 json {"city":"Oslo"}',
            "stop 1",
            f"message_delta tool_use None {FULL_USAGE}",
            "message_stop",
        ],
        id="parallel-tool-calls",
    ),
    pytest.param(
        [
            ROLE,
            chunk({"reasoning_content": "use the tool"}),
            chunk({"tool_calls": [tool(0, id="call_1", name="ls", args="not json")]}),
            chunk({}, "stop"),
        ],
        [
            *START,
            "start 0 thinking",
            "delta 0 thinking 'use the tool'",
            "stop 0",
            "start 1 tool_use call_1 ls",
            'delta 1 json {"_raw":"not json"}',
            "stop 1",
            "message_delta tool_use None {'output_tokens': 2}",
            "message_stop",
        ],
        id="reasoning-then-tool-call-with-bad-json",
    ),
    pytest.param(
        [ROLE, chunk({"content": "The answer is 4"}), chunk({}, "stop", stop_reason="</answer>")],
        [
            *START,
            "start 0 text",
            "delta 0 text 'The answer is 4'",
            "stop 0",
            "message_delta stop_sequence </answer> {'output_tokens': 1}",
            "message_stop",
        ],
        id="matched-stop-sequence",
    ),
    pytest.param(
        [ROLE, chunk({"content": "a"}), chunk({}, "length"), chunk(usage=USAGE)],
        [
            *START,
            "start 0 text",
            "delta 0 text 'a'",
            "stop 0",
            f"message_delta max_tokens None {FULL_USAGE}",
            "message_stop",
        ],
        id="max-tokens",
    ),
    pytest.param(
        [],
        [*START[:1], "ping", "message_delta end_turn None {'output_tokens': 0}", "message_stop"],
        id="empty-upstream",
    ),
]


@pytest.mark.parametrize(("chunks", "expected"), GOLDEN)
def test_golden_transcripts(chunks: list[ChatCompletionChunk], expected: list[str]) -> None:
    got = run(chunks)
    if not chunks:  # no upstream chunk: id and model come from the converter's defaults
        expected = ["message_start msg_cortex  in=0 cached=None", *expected[1:]]
    assert got == expected


def test_error_mid_stream() -> None:
    got = run([ROLE, chunk({"content": "par"})], error="upstream connection lost")
    assert got == [*START, "start 0 text", "delta 0 text 'par'", "error api_error upstream connection lost"]


def test_usage_in_first_chunk_reaches_message_start_and_overrides() -> None:
    converter = AnthropicStreamConverter(model="claude-alias", message_id="msg_fixed")
    first = chunk(
        {"role": "assistant"},
        usage={
            "prompt_tokens": 20,
            "completion_tokens": 0,
            "total_tokens": 20,
            "prompt_tokens_details": {"cached_tokens": 16},
        },
    )
    assert [summary(e) for e in converter.feed(first)] == [
        "message_start msg_fixed claude-alias in=4 cached=16",
        "ping",
    ]


def test_only_first_choice_is_used() -> None:
    other = msgspec.convert(
        {
            "id": "x",
            "model": "m",
            "choices": [{"index": 1, "delta": {"content": "other"}, "finish_reason": None}],
        },
        ChatCompletionChunk,
    )
    assert run([ROLE, other, chunk({"content": "mine"})])[2:4] == ["start 0 text", "delta 0 text 'mine'"]


async def test_anthropic_sdk_rebuilds_the_message_from_our_sse() -> None:
    import anthropic
    import httpx2

    converter = AnthropicStreamConverter()
    events: list[MessageStreamEvent] = []
    for item in GOLDEN[1].values[0] + GOLDEN[3].values[0][1:]:  # type: ignore[operator]
        events += converter.feed(item)
    events += converter.finish()
    body = b"".join(encode_event(event) for event in events)

    def handler(_: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=body, headers={"content-type": "text/event-stream"})

    async with httpx2.AsyncClient(transport=httpx2.MockTransport(handler)) as http:
        client = anthropic.AsyncAnthropic(api_key="k", base_url="http://test", http_client=http)
        async with client.messages.stream(
            model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        ) as stream:
            text = "".join([piece async for piece in stream.text_stream])
            message = await stream.get_final_message()
    assert text == "Yes."
    assert [block.type for block in message.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert message.content[0].thinking == "Let me think"  # type: ignore[union-attr]
    assert [block.input for block in message.content[2:]] == [{"city": "Paris"}, {"city": "Oslo"}]  # type: ignore[union-attr]
    assert message.stop_reason == "tool_use"
    assert message.usage.output_tokens == 9 and message.usage.cache_read_input_tokens == 16
