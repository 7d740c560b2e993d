"""Structured-output grammars: what each request asks for, and that the model's own tool
parser reads every output the grammar allows (random walks through the masks)."""

from __future__ import annotations

import json
import random
from typing import Any

import msgspec
import pytest
from support.tiny_models import build_tokenizer

from cortex_core.errors import ApiError
from cortex_core.openai.chat import ChatCompletionRequest
from neuron.engine.constraint import GrammarConstraint, MaskFiller, unpack_bitmask
from neuron.serving.chat import CHAT_FIELDS
from neuron.serving.structured import GrammarCompiler, request_grammar
from neuron.serving.tools import ToolCallArguments, ToolCallStart, ToolFormat, find_tool_format

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "now"}}  # no parameters: an empty object


def chat(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return msgspec.convert(body, ChatCompletionRequest)


@pytest.fixture(scope="module", params=["tagged", "json", "mistral"])
def format_and_tokenizer(request: pytest.FixtureRequest) -> tuple[ToolFormat, Any]:
    tokenizer = build_tokenizer()
    tool_format = find_tool_format(tokenizer)
    # The same vocabulary read as a model of another format: markers are looked up by id.
    if request.param == "mistral":
        tokenizer.add_tokens(["[TOOL_CALLS]"])
        tool_format = ToolFormat("mistral", ("[TOOL_CALLS]",))
    elif request.param == "json":
        tool_format = ToolFormat("json", ())
    assert tool_format.kind == request.param
    return tool_format, tokenizer


def compiler_for(tokenizer: Any) -> GrammarCompiler:
    return GrammarCompiler("m", tokenizer, frozenset({tokenizer.eos_token_id}))


def random_walk(constraint: GrammarConstraint, eos: int, rng: random.Random, limit: int = 400) -> list[int]:
    """Random allowed tokens until the grammar is complete (or picks EOS where it may end)."""
    filler = MaskFiller()
    tokens: list[int] = []
    for _ in range(limit):
        masks = filler.fill([constraint])
        assert masks is not None
        allowed = unpack_bitmask(masks.bitmask, constraint.vocab_size)[0].nonzero().flatten().tolist()
        token = rng.choice(allowed)
        if token == eos:
            return tokens
        constraint.accept(token)
        tokens.append(token)
        if constraint.finished:
            return tokens
    raise AssertionError(f"the grammar did not end within {limit} tokens")


def parsed_calls(tool_format: ToolFormat, text: str) -> list[tuple[str, dict[str, Any]]]:
    parser = tool_format.parser([WEATHER, CLOCK])
    events = [*parser.push(text), *parser.finish()]
    names = {e.index: e.name for e in events if isinstance(e, ToolCallStart)}
    arguments: dict[int, str] = {}
    for event in events:
        if isinstance(event, ToolCallArguments):
            arguments[event.index] = arguments.get(event.index, "") + event.delta
    return [(names[i], json.loads(arguments[i])) for i in sorted(names)]


@pytest.mark.parametrize(
    ("tool_choice", "parallel", "allowed_names", "at_most_one"),
    [
        ("required", True, {"get_weather", "now"}, False),
        ("required", False, {"get_weather", "now"}, True),
        ({"type": "function", "function": {"name": "get_weather"}}, True, {"get_weather"}, True),
    ],
)
def test_every_forced_call_the_grammar_allows_parses_and_validates(
    format_and_tokenizer: tuple[ToolFormat, Any],
    tool_choice: Any,
    parallel: bool,
    allowed_names: set[str],
    at_most_one: bool,
) -> None:
    tool_format, tokenizer = format_and_tokenizer
    compiler = compiler_for(tokenizer)
    marker_ids = {m: tokenizer.get_vocab()[m] for m in tool_format.markers}
    request = chat(tools=[WEATHER, CLOCK], tool_choice=tool_choice, parallel_tool_calls=parallel)
    structured = request_grammar(request, [WEATHER, CLOCK], tool_format, marker_ids, CHAT_FIELDS)
    assert structured is not None and structured[1] == "tool_choice"
    rng = random.Random(0)
    for _ in range(12):
        tokens = random_walk(
            compiler.constraint(structured[0], "tool_choice", None), tokenizer.eos_token_id, rng
        )
        text = tokenizer.decode(tokens)
        calls = parsed_calls(tool_format, text)
        assert calls, text
        assert not at_most_one or len(calls) == 1, text
        for name, arguments in calls:
            assert name in allowed_names
            if name == "get_weather":
                assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("c", "f"), text
                assert isinstance(arguments["city"], str) and len(arguments["city"]) <= 8
            else:
                assert arguments == {}


def test_response_format_with_tools_is_either_calls_or_the_answer() -> None:
    tokenizer = build_tokenizer()
    tool_format = find_tool_format(tokenizer)
    marker_ids = {m: tokenizer.get_vocab()[m] for m in tool_format.markers}
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    request = chat(
        tools=[WEATHER],
        response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}},
    )
    structured = request_grammar(request, [WEATHER], tool_format, marker_ids, CHAT_FIELDS)
    assert structured is not None and structured[1] == "response_format"
    compiler = compiler_for(tokenizer)
    rng = random.Random(1)
    kinds = set()
    for _ in range(30):
        text = tokenizer.decode(random_walk(compiler.constraint(structured[0], "x", None), 2, rng))
        if text.startswith("<tool_call>"):
            kinds.add("call")
            assert parsed_calls(tool_format, text)[0][0] == "get_weather"
        else:
            kinds.add("answer")
            assert isinstance(json.loads(text)["ok"], bool), text
    assert kinds == {"call", "answer"}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, None),
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({"tools": [WEATHER], "tool_choice": "auto"}, None),
        (
            {"tools": [WEATHER], "tool_choice": "none", "response_format": {"type": "json_object"}},
            "response_format",
        ),
        ({"tools": [WEATHER], "tool_choice": "required"}, "tool_choice"),
    ],
)
def test_which_requests_are_constrained(fields: dict[str, Any], expected: str | None) -> None:
    tokenizer = build_tokenizer()
    tool_format = find_tool_format(tokenizer)
    marker_ids = {m: tokenizer.get_vocab()[m] for m in tool_format.markers}
    request = chat(**fields)
    tools = fields.get("tools", [])
    structured = request_grammar(request, tools, tool_format, marker_ids, CHAT_FIELDS)
    assert (structured[1] if structured else None) == expected


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tool_choice": "required"}, "tool_choice: a tool call is required, but no tools were given"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice: function 'nope' is not one of the request's tools",
        ),
    ],
)
def test_forced_choices_that_cannot_be_met(fields: dict[str, Any], message: str) -> None:
    tokenizer = build_tokenizer()
    with pytest.raises(ApiError) as refused:
        request_grammar(chat(**fields), fields.get("tools", []), find_tool_format(tokenizer), {}, CHAT_FIELDS)
    assert refused.value.status == 400 and refused.value.message == message


def test_an_unenforceable_schema_is_a_400_naming_the_callers_field_and_the_cause() -> None:
    compiler = compiler_for(build_tokenizer())
    grammar = 'start: answer\nanswer: %json {"type": "object", "properties": {"a": {"not": {}}}}'
    with pytest.raises(ApiError) as refused:
        compiler.constraint(grammar, "text.format", None)
    error = refused.value
    assert (error.status, error.param, error.code) == (400, "text.format", "unsupported_schema")
    assert (
        error.message.startswith("text.format: this schema cannot be enforced: ") and "not" in error.message
    )


def test_compiled_grammars_are_cached_and_each_request_gets_its_own_state() -> None:
    tokenizer = build_tokenizer()
    compiler = compiler_for(tokenizer)
    grammar = 'start: answer\nanswer: %json {"type": "integer"}'
    first = compiler.constraint(grammar, "response_format", None)
    second = compiler.constraint(grammar, "response_format", None)
    assert first.matcher is not second.matcher
    first.accept(tokenizer.encode("7")[0])
    assert len(compiler._compiled) == 1
    assert random_walk(second, tokenizer.eos_token_id, random.Random(2)) != []
