"""Tool calls in the model's own format -> OpenAI `tool_calls`, streaming and not.

Formats of common chat templates:
* Qwen / Hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (several per
  turn), or Qwen3-Coder's XML body `<function=NAME><parameter=KEY>VALUE</parameter></function>`;
* Llama 3: the whole message is `{"name": ..., "parameters"|"arguments": {...}}`,
  optionally after `<|python_tag|>`;
* Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` or
  `[TOOL_CALLS]NAME[ARGS]{...}`.

Parsers consume content text and produce events: content deltas, a call's start (id and
name) and argument deltas. JSON bodies whose `name` comes first stream their arguments as
they are generated (holding back only what could be the wrapper's closing brace); other
shapes are parsed whole when they end. Non-streaming responses run the same parser over the
whole text, so both paths give the same calls by construction. A body that is not a tool
call after all stays in the content verbatim.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArguments:
    index: int
    delta: str


ToolEvent = ContentDelta | ToolCallStart | ToolCallArguments

# `{"name": "f", "arguments": ` — the point from which the arguments value can stream.
# The lookahead waits for the value's first character, so a header matched mid-stream starts
# the arguments at the same place as one matched on the whole text.
_JSON_HEADER = re.compile(
    r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\S)'
)
_XML_FUNCTION = re.compile(r"<function=([^>\s]+)>(.*?)(?:</function>|$)", re.DOTALL)
_XML_PARAMETER = re.compile(r"<parameter=([^>\s]+)>(.*?)(?:</parameter>|(?=<parameter=)|$)", re.DOTALL)


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def _partial_suffix(text: str, marker: str) -> int:
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


def _json_arguments(value: Any) -> str:
    if value is None:
        return "{}"
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


_SCHEMA_TYPES: dict[str, type | tuple[type, ...]] = {
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "object": dict,
    "array": list,
}


def _coerce(value: str, kind: Any) -> Any:
    """A Qwen-XML parameter value, typed by the request's JSON schema."""
    if kind == "string":
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return value
    expected = _SCHEMA_TYPES.get(kind)
    if expected is None or isinstance(parsed, expected):
        return parsed
    return value


def _parameter_types(tools: Sequence[Mapping[str, Any]], name: str) -> dict[str, Any]:
    for tool in tools:
        function = tool.get("function") or tool
        if function.get("name") == name:
            properties = (function.get("parameters") or {}).get("properties") or {}
            return {key: spec.get("type") for key, spec in properties.items() if isinstance(spec, dict)}
    return {}


def parse_call_body(body: str, tools: Sequence[Mapping[str, Any]]) -> tuple[str, str] | None:
    """(name, arguments JSON) of a complete call body, JSON or Qwen XML; None if neither."""
    stripped = body.strip()
    if stripped.startswith("<function="):
        match = _XML_FUNCTION.match(stripped)
        if not match:
            return None
        name = match.group(1)
        types = _parameter_types(tools, name)
        arguments = {
            key: _coerce(value.strip("\n"), types.get(key))
            for key, value in _XML_PARAMETER.findall(match.group(2))
        }
        return name, json.dumps(arguments, ensure_ascii=False)
    try:
        call = json.loads(stripped)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    return call["name"], _json_arguments(call.get("arguments", call.get("parameters")))


class _StreamedCall:
    """One call whose JSON body arrives piece by piece."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.name: str | None = None
        self.arguments = ""  # exactly what has been emitted as argument deltas
        self._args_start = 0

    def advance(self, body: str, hold_marker: str | None) -> list[ToolEvent]:
        events: list[ToolEvent] = []
        if self.name is None:
            header = _JSON_HEADER.match(body)
            if not header:
                return events
            self.name = json.loads(header.group(1))
            self._args_start = header.end()
            events.append(ToolCallStart(self.index, new_call_id(), self.name))
        candidate = body[self._args_start :]
        if hold_marker:
            candidate = candidate[: len(candidate) - _partial_suffix(candidate, hold_marker)]
        candidate = candidate.rstrip()
        # The last "}" may close the wrapper object rather than the arguments.
        if candidate.endswith("}"):
            candidate = candidate[:-1]
        if len(candidate) > len(self.arguments) and candidate.startswith(self.arguments):
            events.append(ToolCallArguments(self.index, candidate[len(self.arguments) :]))
            self.arguments = candidate
        return events

    def complete(self, body: str, tools: Sequence[Mapping[str, Any]]) -> list[ToolEvent] | None:
        """Events that finish this call, or None when the body is no call (stays content)."""
        events = self.advance(body, None)
        if self.name is not None:
            return events
        parsed = parse_call_body(body, tools)
        if parsed is None:
            return None
        name, arguments = parsed
        self.name, self.arguments = name, arguments
        return [ToolCallStart(self.index, new_call_id(), name), ToolCallArguments(self.index, arguments)]


class ToolCallParser(Protocol):
    calls: int

    def push(self, text: str) -> list[ToolEvent]: ...

    def finish(self) -> list[ToolEvent]: ...


class TaggedToolCallParser:
    """`<tool_call>...</tool_call>` blocks anywhere in the text (Qwen, Hermes)."""

    def __init__(self, tools: Sequence[Mapping[str, Any]], open_tag: str, close_tag: str) -> None:
        self._tools = tools
        self._open, self._close = open_tag, close_tag
        self._buffer = ""
        self._call: _StreamedCall | None = None
        self.calls = 0

    def push(self, text: str) -> list[ToolEvent]:
        events: list[ToolEvent] = []
        self._buffer += text
        while self._buffer:
            if self._call is None:
                found = self._buffer.find(self._open)
                if found < 0:
                    keep = _partial_suffix(self._buffer, self._open)
                    if len(self._buffer) > keep:
                        events.append(ContentDelta(self._buffer[: len(self._buffer) - keep]))
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    break
                if found:
                    events.append(ContentDelta(self._buffer[:found]))
                self._buffer = self._buffer[found + len(self._open) :]
                self._call = _StreamedCall(self.calls)
                continue
            closed = self._buffer.find(self._close)
            if closed < 0:
                events.extend(self._call.advance(self._buffer, self._close))
                break
            events.extend(self._end_call(self._buffer[:closed]))
            self._buffer = self._buffer[closed + len(self._close) :]
        return events

    def _end_call(self, body: str) -> list[ToolEvent]:
        assert self._call is not None
        done = self._call.complete(body, self._tools)
        self._call = None
        if done is None:
            return [ContentDelta(self._open + body + self._close)]
        self.calls += 1
        return done

    def finish(self) -> list[ToolEvent]:
        if self._call is None:
            rest, self._buffer = self._buffer, ""
            return [ContentDelta(rest)] if rest else []
        # An unterminated block: a call if it parses, else the raw text.
        call, body, self._buffer = self._call, self._buffer, ""
        done = call.complete(body, self._tools)
        self._call = None
        if done is None:
            return [ContentDelta(self._open + body)]
        self.calls += 1
        return done


class JsonMessageToolCallParser:
    """Llama 3: the whole message is one JSON call, optionally after `<|python_tag|>`."""

    PYTHON_TAG = "<|python_tag|>"

    def __init__(self, tools: Sequence[Mapping[str, Any]]) -> None:
        self._tools = tools
        self._buffer = ""
        self._mode: str | None = None  # None: undecided, "content" or "call"
        self._call = _StreamedCall(0)
        self.calls = 0

    def push(self, text: str) -> list[ToolEvent]:
        if self._mode == "content":
            return [ContentDelta(text)] if text else []
        self._buffer += text
        if self._mode is None:
            head = self._buffer.lstrip()
            if head.startswith(self.PYTHON_TAG):
                head = head[len(self.PYTHON_TAG) :].lstrip()
            elif self.PYTHON_TAG.startswith(head):
                return []  # still whitespace or part of the tag
            if not head:
                return []
            if not head.startswith("{"):
                self._mode = "content"
                text, self._buffer = self._buffer, ""
                return [ContentDelta(text)]
            self._mode = "call"
            self._buffer = head
        return self._call.advance(self._buffer, None)

    def finish(self) -> list[ToolEvent]:
        if self._mode != "call":
            rest, self._buffer = self._buffer, ""
            return [ContentDelta(rest)] if rest.strip() else []
        done = self._call.complete(self._buffer, self._tools)
        if done is None:
            return [ContentDelta(self._buffer)]
        self.calls = 1
        return done


class MistralToolCallParser:
    """`[TOOL_CALLS]` then a JSON list of calls, or `NAME[ARGS]{...}` runs; parsed at the end."""

    MARKER = "[TOOL_CALLS]"
    ARGS = "[ARGS]"

    def __init__(self, tools: Sequence[Mapping[str, Any]]) -> None:
        self._tools = tools
        self._buffer = ""
        self._in_calls = False
        self.calls = 0

    def push(self, text: str) -> list[ToolEvent]:
        self._buffer += text
        if self._in_calls:
            return []
        found = self._buffer.find(self.MARKER)
        if found >= 0:
            self._in_calls = True
            before, self._buffer = self._buffer[:found], self._buffer[found:]
            return [ContentDelta(before)] if before else []
        keep = _partial_suffix(self._buffer, self.MARKER)
        out, self._buffer = self._buffer[: len(self._buffer) - keep], self._buffer[len(self._buffer) - keep :]
        return [ContentDelta(out)] if out else []

    def _parse(self, body: str) -> list[tuple[str, str]] | None:
        chunks = [chunk.strip() for chunk in body.split(self.MARKER) if chunk.strip()]
        calls: list[tuple[str, str]] = []
        for chunk in chunks:
            if self.ARGS in chunk:
                name, _, arguments = chunk.partition(self.ARGS)
                try:
                    json.loads(arguments)
                except json.JSONDecodeError:
                    return None
                calls.append((name.strip(), arguments.strip()))
                continue
            try:
                value = json.loads(chunk)
            except json.JSONDecodeError:
                return None
            for item in value if isinstance(value, list) else [value]:
                if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                    return None
                calls.append((item["name"], _json_arguments(item.get("arguments", item.get("parameters")))))
        return calls or None

    def finish(self) -> list[ToolEvent]:
        body, self._buffer = self._buffer, ""
        if not self._in_calls:
            return [ContentDelta(body)] if body else []
        parsed = self._parse(body)
        if parsed is None:
            return [ContentDelta(body)]
        events: list[ToolEvent] = []
        for index, (name, arguments) in enumerate(parsed):
            events += [ToolCallStart(index, new_call_id(), name), ToolCallArguments(index, arguments)]
        self.calls = len(parsed)
        return events


@dataclass(frozen=True)
class ToolFormat:
    """Which parser a model's vocabulary calls for, and the marker tokens it must keep."""

    kind: str  # "tagged" | "mistral" | "json"
    markers: tuple[str, ...]

    def _wrap(self, body: str) -> str:
        """One JSON call body as this format's parser reads it."""
        if self.kind == "tagged":
            return f"{self.markers[0]}\n{body}\n{self.markers[1]}"
        if self.kind == "mistral":
            return f"{self.markers[0]}[{body}]"
        return body

    def call_example(self) -> str:
        return self._wrap('{"name": "<function name>", "arguments": {<arguments as a JSON object>}}')

    def write_call(self, call: Mapping[str, Any]) -> str:
        """An earlier call of the conversation (an OpenAI tool call) in this format."""
        function = call.get("function") or call
        body = {"name": function.get("name"), "arguments": function.get("arguments") or {}}
        return self._wrap(json.dumps(body, ensure_ascii=False))

    def parser(self, tools: Sequence[Mapping[str, Any]]) -> ToolCallParser:
        if self.kind == "tagged":
            return TaggedToolCallParser(tools, self.markers[0], self.markers[1])
        if self.kind == "mistral":
            return MistralToolCallParser(tools)
        return JsonMessageToolCallParser(tools)


def find_tool_format(tokenizer: Any) -> ToolFormat:
    vocab = tokenizer.get_vocab()
    if "<tool_call>" in vocab and "</tool_call>" in vocab:
        return ToolFormat("tagged", ("<tool_call>", "</tool_call>"))
    if MistralToolCallParser.MARKER in vocab:
        markers = [m for m in (MistralToolCallParser.MARKER, MistralToolCallParser.ARGS) if m in vocab]
        return ToolFormat("mistral", tuple(markers))
    tag = JsonMessageToolCallParser.PYTHON_TAG
    return ToolFormat("json", (tag,) if tag in vocab else ())


# The share of a model's context window left to the answer when tools are listed in its
# system message: they never take the prompt past the rest (docs/inference.md, "Tool calls").
# A client must still fit a useful answer: Claude Code, for one, retries its first request
# (max_tokens 32000) only when the window leaves 4,000 tokens beside the prompt.
ANSWER_SHARE = 0.5
# A brief listing keeps the first sentence of a tool's description, at most this long.
BRIEF_DESCRIPTION_CHARS = 200


def tool_instructions(
    tools: Sequence[Mapping[str, Any]], tool_format: ToolFormat, fits: Callable[[str], bool]
) -> str | None:
    """The tools and how to call them, for a model whose chat template has no place for tools
    (docs/inference.md, "Tool calls"), written in the format its parser reads: every tool
    whole if that `fits`, else briefly (`brief_tool`), else None (coding agents send tens of
    tools with pages of description, more than a small model's whole window)."""
    for brief in (False, True):
        listed = "\n".join(
            json.dumps(brief_tool(tool) if brief else whole_tool(tool), ensure_ascii=False) for tool in tools
        )
        instructions = (
            "# Tools\n\nYou may call one or more of these functions (their parameters are JSON schemas):\n"
            f"{listed}\n\nTo call a function, answer with only this, once per call:\n{tool_format.call_example()}"
        )
        if fits(instructions):
            return instructions
    return None


def whole_tool(tool: Mapping[str, Any]) -> dict[str, Any]:
    """A tool's name, description and parameters as the request gave them."""
    function = tool.get("function") or tool
    return {key: value for key, value in function.items() if key in ("name", "description", "parameters")}


def brief_tool(tool: Mapping[str, Any]) -> dict[str, Any]:
    """A tool's name, the first sentence of its description, and its parameters' names and
    types (and which are required)."""
    whole = whole_tool(tool)
    out: dict[str, Any] = {"name": whole.get("name")}
    description = str(whole.get("description") or "").strip().split("\n", 1)[0]
    if description:
        sentence = re.match(r".*?[.!?](?=\s|$)", description)
        out["description"] = (sentence.group(0) if sentence else description)[:BRIEF_DESCRIPTION_CHARS]
    parameters = whole.get("parameters")
    if isinstance(parameters, Mapping):
        properties = parameters.get("properties")
        brief: dict[str, Any] = {"type": parameters.get("type", "object")}
        if isinstance(properties, Mapping):
            brief["properties"] = {
                name: {"type": schema["type"]} if isinstance(schema, Mapping) and "type" in schema else {}
                for name, schema in properties.items()
            }
        if parameters.get("required"):
            brief["required"] = parameters["required"]
        out["parameters"] = brief
    return out
