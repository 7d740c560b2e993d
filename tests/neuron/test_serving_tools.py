"""Tool-call parsing per format, streaming deltas reassembling to the non-streaming result."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from neuron.serving.tools import (
    ContentDelta,
    JsonMessageToolCallParser,
    MistralToolCallParser,
    TaggedToolCallParser,
    ToolCallArguments,
    ToolCallParser,
    ToolCallStart,
    ToolEvent,
    ToolFormat,
    brief_tool,
    find_tool_format,
    tool_instructions,
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "metric": {"type": "boolean"},
                },
            },
        },
    }
]


def tagged() -> ToolCallParser:
    return TaggedToolCallParser(TOOLS, "<tool_call>", "</tool_call>")


def llama() -> ToolCallParser:
    return JsonMessageToolCallParser(TOOLS)


def mistral() -> ToolCallParser:
    return MistralToolCallParser(TOOLS)


def run(parser: ToolCallParser, pieces: list[str]) -> tuple[str, list[tuple[str, str, str]], list[ToolEvent]]:
    events = [event for piece in pieces for event in parser.push(piece)] + parser.finish()
    content = "".join(event.text for event in events if isinstance(event, ContentDelta))
    calls: dict[int, list[str]] = {}
    for event in events:
        if isinstance(event, ToolCallStart):
            calls[event.index] = [event.id, event.name, ""]
        elif isinstance(event, ToolCallArguments):
            calls[event.index][2] += event.delta
    return content, [(c[0], c[1], c[2]) for c in (calls[i] for i in sorted(calls))], events


def chop(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


CASES: list[tuple[str, Any, str, str, list[tuple[str, dict[str, Any]]]]] = [
    # (name, parser, model output, expected content, expected [(name, arguments)])
    (
        "hermes-one",
        tagged,
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}\n</tool_call>',
        "Let me check.\n",
        [("get_weather", {"city": "Zürich", "days": 2})],
    ),
    (
        "hermes-two-nested",
        tagged,
        '<tool_call>{"name": "a", "arguments": {"x": {"y": [1, {"z": "}"}]}}}</tool_call>\n'
        '<tool_call>{"name": "b", "arguments": {}}</tool_call>',
        "\n",
        [("a", {"x": {"y": [1, {"z": "}"}]}}), ("b", {})],
    ),
    (
        "hermes-arguments-before-name",
        tagged,
        '<tool_call>{"arguments": {"city": "Paris"}, "name": "get_weather"}</tool_call>',
        "",
        [("get_weather", {"city": "Paris"})],
    ),
    (
        "hermes-not-json-stays-content",
        tagged,
        "<tool_call>not a call</tool_call> done",
        "<tool_call>not a call</tool_call> done",
        [],
    ),
    (
        "hermes-qwen-xml",
        tagged,
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nSão Paulo\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n<parameter=metric>\ntrue\n</parameter>\n</function>\n</tool_call>",
        "",
        [("get_weather", {"city": "São Paulo", "days": 3, "metric": True})],
    ),
    (
        "hermes-unterminated-call",
        tagged,
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}',
        "",
        [("get_weather", {"city": "Rome"})],
    ),
    (
        "llama-parameters",
        llama,
        '{"name": "get_weather", "parameters": {"city": "Berlin"}}',
        "",
        [("get_weather", {"city": "Berlin"})],
    ),
    (
        "llama-python-tag",
        llama,
        '<|python_tag|>{"name": "get_weather", "arguments": {"city": "Oslo"}}',
        "",
        [("get_weather", {"city": "Oslo"})],
    ),
    ("llama-plain-text", llama, "The weather is {unknown}.", "The weather is {unknown}.", []),
    ("llama-json-not-a-call", llama, '{"answer": 42}', '{"answer": 42}', []),
    (
        "mistral-list",
        mistral,
        'Sure. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Lyon"}}, '
        '{"name": "get_weather", "arguments": {"city": "Nice"}}]',
        "Sure. ",
        [("get_weather", {"city": "Lyon"}), ("get_weather", {"city": "Nice"})],
    ),
    (
        "mistral-args-form",
        mistral,
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Lyon"}[TOOL_CALLS]get_weather[ARGS]{"city": "Nice"}',
        "",
        [("get_weather", {"city": "Lyon"}), ("get_weather", {"city": "Nice"})],
    ),
    ("mistral-garbage", mistral, "[TOOL_CALLS]oops", "[TOOL_CALLS]oops", []),
]


@pytest.mark.parametrize(("name", "make", "output", "content", "calls"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("piece_size", [1, 3, 7, 10_000])
def test_parse_streaming_and_whole(
    name: str, make: Any, output: str, content: str, calls: list[tuple[str, dict[str, Any]]], piece_size: int
) -> None:
    got_content, got_calls, _ = run(make(), chop(output, piece_size))
    assert got_content == content
    assert [(call_name, json.loads(arguments)) for _, call_name, arguments in got_calls] == calls
    for call_id, _, _ in got_calls:
        assert re.fullmatch(r"call_[0-9a-f]{24}", call_id)


@pytest.mark.parametrize(("name", "make", "output", "content", "calls"), CASES, ids=[c[0] for c in CASES])
def test_streamed_arguments_equal_non_streaming(
    name: str, make: Any, output: str, content: str, calls: list[tuple[str, dict[str, Any]]]
) -> None:
    _, whole, _ = run(make(), [output])
    _, streamed, _ = run(make(), chop(output, 1))
    assert [(n, a) for _, n, a in streamed] == [(n, a) for _, n, a in whole]


def test_hermes_streams_name_first_then_argument_deltas() -> None:
    text = '<tool_call>{"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}</tool_call>'
    _, _, events = run(tagged(), chop(text, 2))
    kinds = [type(event).__name__ for event in events]
    assert kinds[0] == "ToolCallStart"
    assert kinds.count("ToolCallArguments") > 5  # arguments arrive as they are generated
    assert not any(isinstance(event, ContentDelta) for event in events)


def test_text_before_a_call_streams_before_the_call_ends() -> None:
    parser = tagged()
    assert parser.push("Checking") == [ContentDelta("Checking")]
    assert parser.push(" now <tool_") == [ContentDelta(" now ")]  # a partial tag is held
    assert parser.push('call>{"name": "x", ') == []


@pytest.mark.parametrize(
    ("tokens", "kind"),
    [
        (["<tool_call>", "</tool_call>"], "tagged"),
        (["[TOOL_CALLS]", "[ARGS]"], "mistral"),
        (["<|python_tag|>"], "json"),
        ([], "json"),
    ],
)
def test_format_from_vocabulary(tokens: list[str], kind: str) -> None:
    class Vocab:
        def get_vocab(self) -> dict[str, int]:
            return {token: index for index, token in enumerate(tokens)}

    assert find_tool_format(Vocab()).kind == kind


BASH = {
    "type": "function",
    "function": {
        "name": "Bash",
        "description": "Executes a bash command and returns its output. The working directory persists.\n\n"
        "- Quote paths with spaces.\n- Prefer dedicated tools.",
        "parameters": {
            "type": "object",
            "properties": {
                "command": {"type": "string", "description": "The command to run"},
                "timeout": {"type": "number", "description": "Milliseconds", "maximum": 600000},
                "anything": {"description": "no type given"},
            },
            "required": ["command"],
            "additionalProperties": False,
        },
    },
}


@pytest.mark.parametrize(
    ("tool", "expected"),
    [
        (
            BASH,
            {
                "name": "Bash",
                "description": "Executes a bash command and returns its output.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "command": {"type": "string"},
                        "timeout": {"type": "number"},
                        "anything": {},
                    },
                    "required": ["command"],
                },
            },
        ),
        # Anthropic's shape is converted before it gets here; a bare function works too.
        ({"name": "ping"}, {"name": "ping"}),
        ({"name": "a", "description": "No full stop"}, {"name": "a", "description": "No full stop"}),
        ({"name": "a", "description": "v1.2 is out! More."}, {"name": "a", "description": "v1.2 is out!"}),
        ({"name": "a", "description": "x" * 500}, {"name": "a", "description": "x" * 200}),
        (
            {"name": "a", "parameters": {"type": "object", "properties": {}}},
            {"name": "a", "parameters": {"type": "object", "properties": {}}},
        ),
    ],
)
def test_a_brief_tool_keeps_the_first_sentence_and_the_parameter_types(
    tool: dict[str, Any], expected: dict[str, Any]
) -> None:
    assert brief_tool(tool) == expected


@pytest.mark.parametrize(
    ("room", "listed"),
    [(800, "whole"), (600, "brief"), (400, None)],  # the whole listing is 719 characters, the brief 482
    ids=["whole", "brief", "left-out"],
)
def test_tool_instructions_list_the_tools_as_fully_as_the_room_allows(room: int, listed: str | None) -> None:
    tagged = ToolFormat("tagged", ("<tool_call>", "</tool_call>"))
    instructions = tool_instructions([BASH], tagged, lambda text: len(text) <= room)
    if listed is None:
        assert instructions is None
        return
    assert instructions is not None
    line = instructions.splitlines()[3]
    want = BASH["function"] if listed == "whole" else brief_tool(BASH)
    assert json.loads(line) == want
    assert '<tool_call>\n{"name": "<function name>"' in instructions  # how to call, either way
