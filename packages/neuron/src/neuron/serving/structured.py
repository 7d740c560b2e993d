"""Structured outputs: a chat request's `response_format` or forced `tool_choice` -> a grammar.

The grammar engine is llguidance (docs/engine.md, "Structured outputs"): a Rust library
with no Python dependencies of its own, whose token masks take tens of microseconds and
need no compilation step ahead of the first request. The answer's grammar is written in
its Lark dialect, which embeds JSON schemas (`%json {...}`) and names single tokens by id
(`<[id]>`), so one grammar can say "a `<tool_call>` token, a JSON call whose arguments
follow the tool's schema, a `</tool_call>` token".

What each request asks for:
* `response_format` `json_object` -> any JSON object; `json_schema` -> that schema (with or
  without `strict`: the schema is always enforced);
* `tool_choice` `required` -> one or more calls (exactly one with `parallel_tool_calls`
  false) of any of the tools, a named function -> one call of it, each in the model's own
  tool-call format so its parser reads them and the arguments follow the tool's schema;
* `response_format` together with tools and `tool_choice` `auto` -> either calls or the
  formatted answer.

JSON is generated without free whitespace between tokens (`", "` and `": "` separators):
a weak model given free whitespace can emit it until `max_tokens`.

Grammars are built here as text (pure), then validated and compiled once per model and
grammar and kept in a small LRU; each request gets a copy of the compiled matcher.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from llguidance import LLMatcher

from cortex_core.errors import ApiError
from cortex_core.openai.chat import (
    ChatCompletionNamedToolChoice,
    ChatCompletionRequest,
    ResponseFormatJSONObject,
    ResponseFormatJSONSchema,
)
from cortex_core.wire import given
from neuron.engine.constraint import GrammarConstraint, ReasoningGate
from neuron.serving.params import invalid
from neuron.serving.tools import ToolFormat

# The JSON compiler's options, given inside every embedded schema (llguidance's `x-guidance`).
JSON_OPTIONS: Mapping[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
# Compiled grammars kept per model: agents send the same few schemas over and over.
GRAMMAR_CACHE_ENTRIES = 64
# Error code of a grammar the engine cannot enforce (a 400 naming the field and the reason).
UNSUPPORTED_SCHEMA = "unsupported_schema"


def _json_rule(schema: Mapping[str, Any]) -> str:
    """`%json {...}` for a schema, with our compiler options."""
    return "%json " + json.dumps({**schema, "x-guidance": dict(JSON_OPTIONS)}, ensure_ascii=False)


def _function(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    function = tool.get("function")
    return function if isinstance(function, Mapping) else tool


# OpenAI: "omitting parameters defines a function with an empty parameter list".
NO_PARAMETERS: Mapping[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


def _parameters(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    parameters = _function(tool).get("parameters")
    return parameters if isinstance(parameters, Mapping) and parameters else NO_PARAMETERS


def _call_object(tool: Mapping[str, Any], arguments_key: str) -> dict[str, Any]:
    """The schema of one JSON call body: `{"name": <this tool>, <arguments_key>: {...}}`."""
    return {
        "type": "object",
        "properties": {"name": {"const": _function(tool)["name"]}, arguments_key: _parameters(tool)},
        "required": ["name", arguments_key],
        "additionalProperties": False,
    }


def _token(token_id: int) -> str:
    return f"<[{token_id}]>"


def tool_call_grammar(
    tools: Sequence[Mapping[str, Any]],
    tool_format: ToolFormat,
    marker_ids: Mapping[str, int],
    *,
    parallel: bool,
) -> list[str]:
    """Lark rules whose `calls` rule is one or more (`parallel`) calls in the model's format.

    `marker_ids`: the token id of each of the format's markers. Tagged formats get JSON bodies
    (the parser also reads Qwen's XML bodies, but a JSON body carries the schema exactly).
    """
    if tool_format.kind == "mistral":
        marker = _token(marker_ids[tool_format.markers[0]])
        items = {"anyOf": [_call_object(tool, "arguments") for tool in tools]}
        array: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
        if not parallel:
            array["maxItems"] = 1
        return [f"calls: {marker} {_json_rule(array)}"]
    # One rule per tool: `call_0 | call_1 | ...`, each the tool's own JSON body.
    key = "arguments" if tool_format.kind == "tagged" else "parameters"
    names = [f"call_{index}" for index in range(len(tools))]
    bodies = [
        f"{name}: {_json_rule(_call_object(tool, key))}" for name, tool in zip(names, tools, strict=True)
    ]
    body = " | ".join(names)
    if tool_format.kind == "tagged":
        open_id, close_id = (marker_ids[marker] for marker in tool_format.markers[:2])
        repeat = ' ("\\n" call)*' if parallel else ""
        return [
            f"calls: call{repeat}",
            f'call: {_token(open_id)} "\\n" ({body}) "\\n" {_token(close_id)}',
            *bodies,
        ]
    # One JSON object as the whole message (Llama 3's format).
    return [f"calls: {body}", *bodies]


def _response_schema(request: ChatCompletionRequest) -> Mapping[str, Any] | None:
    response_format = given(request.response_format)
    if isinstance(response_format, ResponseFormatJSONSchema):
        schema = given(response_format.json_schema.schema)
        return schema if isinstance(schema, Mapping) else {"type": "object"}
    if isinstance(response_format, ResponseFormatJSONObject):
        return {"type": "object"}
    return None


def _forced_tools(
    request: ChatCompletionRequest, tools: Sequence[Mapping[str, Any]], field_names: Mapping[str, str]
) -> Sequence[Mapping[str, Any]] | None:
    """The tools a forced `tool_choice` allows (None: the choice is not forced)."""
    choice = given(request.tool_choice)
    name = field_names.get("tool_choice", "tool_choice")
    if (choice == "required" or isinstance(choice, ChatCompletionNamedToolChoice)) and not tools:
        raise invalid(f"{name}: a tool call is required, but no tools were given", name)
    if choice == "required":
        return tools
    if isinstance(choice, ChatCompletionNamedToolChoice):
        wanted = choice.function.name
        named = [tool for tool in tools if _function(tool).get("name") == wanted]
        if not named:
            raise invalid(f"{name}: function {wanted!r} is not one of the request's tools", name)
        return named[:1]
    return None


def request_grammar(
    request: ChatCompletionRequest,
    tools: Sequence[Mapping[str, Any]],
    tool_format: ToolFormat,
    marker_ids: Mapping[str, int],
    field_names: Mapping[str, str],
) -> tuple[str, str] | None:
    """(Lark grammar, the request field it enforces) for a structured request; None for free text."""
    forced = _forced_tools(request, tools, field_names)
    parallel = given(request.parallel_tool_calls) is not False
    if forced is not None:
        # A named function is called once, as OpenAI does.
        once = isinstance(given(request.tool_choice), ChatCompletionNamedToolChoice)
        rules = tool_call_grammar(forced, tool_format, marker_ids, parallel=parallel and not once)
        return "\n".join(["start: calls", *rules]), "tool_choice"
    schema = _response_schema(request)
    if schema is None:
        return None
    answer = f"answer: {_json_rule(schema)}"
    if tools and given(request.tool_choice) != "none":
        rules = tool_call_grammar(tools, tool_format, marker_ids, parallel=parallel)
        return "\n".join(["start: calls | answer", answer, *rules]), "response_format"
    return "\n".join(["start: answer", answer]), "response_format"


class GrammarCompiler:
    """One model's grammar engine: its llguidance tokenizer (built at the first structured
    request: ~1 s for a large vocabulary) and its compiled grammars. Thread-safe: requests
    are prepared on worker threads."""

    def __init__(self, model_id: str, tokenizer: Any, eos_ids: frozenset[int]) -> None:
        self._model_id = model_id
        self._hf_tokenizer = tokenizer
        self._eos_ids = eos_ids
        self._lock = threading.Lock()
        self._tokenizer: Any = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()

    def _ll_tokenizer(self) -> Any:
        if self._tokenizer is None:
            import llguidance.hf  # imports transformers: only once a structured request comes

            try:
                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, eos_token=sorted(self._eos_ids) or None
                )
            except (AssertionError, TypeError, ValueError) as exc:
                raise ApiError(
                    400,
                    f"model '{self._model_id}' cannot do structured outputs: its tokenizer is not "
                    f"a fast (tokenizers) one ({exc or type(exc).__name__})",
                    code="structured_outputs_unsupported",
                ) from exc
        return self._tokenizer

    def constraint(self, grammar: str, field: str, gate: ReasoningGate | None) -> GrammarConstraint:
        """A fresh constraint for one request; a 400 naming `field` if it cannot be enforced."""
        with self._lock:
            tokenizer = self._ll_tokenizer()
            matcher = self._compiled.get(grammar)
            if matcher is None:
                compiled = LLMatcher.grammar_from_lark(grammar)
                failed, messages = LLMatcher.validate_grammar_with_warnings(compiled, tokenizer)
                matcher = None if failed else LLMatcher(tokenizer, compiled, log_level=0)
                if matcher is None or matcher.is_error():
                    reason = messages[0] if failed and messages else matcher.get_error() if matcher else ""
                    raise ApiError(
                        400,
                        f"{field}: this schema cannot be enforced: {str(reason).splitlines()[0]}",
                        code=UNSUPPORTED_SCHEMA,
                        param=field,
                    )
                self._compiled[grammar] = matcher
                while len(self._compiled) > GRAMMAR_CACHE_ENTRIES:
                    self._compiled.popitem(last=False)
            else:
                self._compiled.move_to_end(grammar)
            fresh = matcher.deep_copy()
            vocab_size = int(tokenizer.vocab_size)
        return GrammarConstraint(fresh, vocab_size, gate)
