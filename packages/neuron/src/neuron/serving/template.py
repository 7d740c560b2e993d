"""Chat template rendering with minijinja, set up the way transformers sets up jinja2.

transformers renders chat templates in a sandboxed jinja2 environment with `trim_blocks`,
`lstrip_blocks`, a non-escaping `tojson`, `raise_exception` and `strftime_now`; minijinja
matches it once configured the same way (toolchain.md §5). Two differences are handled
here: the HF-only `{% generation %}` tags are removed before compiling, and because
minijinja hands templates live Python objects (a template could `messages.pop()`), every
render gets a fresh deep copy of the request data.

Messages reaching the template are plain JSON-like dicts. Multi-part content is joined into
a string (most templates concatenate `message.content` directly), except a vision model's
message with images, which keeps its parts as `{"type": "image"}` / `{"type": "text"}` for
the template to place (vision/prepare.py then expands each placeholder). A text-only
model's image parts are refused before any device work.
"""

from __future__ import annotations

import copy
import datetime
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import minijinja

from cortex_core.errors import ApiError

# What transformers' templates assume when a model ships none: ChatML, as SmolLM2 and Qwen use.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Appended to a prefilled assistant message for one render, to find where its content ends;
# letters only, so that no template filter escapes or splits it.
CONTINUATION_MARKER = "CortexContinuationMarker7f3a9c"

_GENERATION_TAG = re.compile(r"{%-?\s*(?:generation|endgeneration)\s*-?%}")
_TEMPLATE_NAME = "chat"


def _raise_exception(message: str) -> None:
    raise minijinja.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> Any:
    # minijinja's own tojson HTML-escapes `<`, `&` and quotes; HF templates expect json.dumps.
    text = json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
    return minijinja.safe(text)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _template_error(model_id: str, exc: minijinja.TemplateError) -> ApiError:
    # `.message` is the one-line reason; str(exc) appends a multi-line source excerpt.
    reason = getattr(exc, "message", None) or str(exc).splitlines()[0]
    return ApiError(
        400,
        f"the chat template of model '{model_id}' failed to render: {reason}",
        code="template_render_failed",
    )


def template_takes_tools(source: str | None) -> bool:
    """Whether a chat template renders the request's `tools` (it reads the variable)."""
    return bool(source and "tools" in source)


class ChatTemplate:
    """A compiled chat template plus the special-token variables HF exposes to it."""

    def __init__(self, model_id: str, source: str | None, special_tokens: Mapping[str, str]) -> None:
        self.model_id = model_id
        self.is_fallback = source is None or not source.strip()
        self.takes_tools = template_takes_tools(source)
        self.special_tokens = dict(special_tokens)
        self._env = minijinja.Environment(trim_blocks=True, lstrip_blocks=True)
        self._env.add_global("raise_exception", _raise_exception)
        self._env.add_global("strftime_now", _strftime_now)
        self._env.add_filter("tojson", _tojson)
        text = CHATML_TEMPLATE if self.is_fallback else _GENERATION_TAG.sub("", source or "")
        try:
            self._env.add_template(_TEMPLATE_NAME, text)
        except minijinja.TemplateError as exc:
            raise _template_error(model_id, exc) from exc

    @classmethod
    def for_tokenizer(cls, model_id: str, source: str | None, tokenizer: Any) -> ChatTemplate:
        tokens = {
            name: value
            for name, value in getattr(tokenizer, "special_tokens_map", {}).items()
            if isinstance(value, str)
        }
        tokens.setdefault("bos_token", "")
        tokens.setdefault("eos_token", "")
        return cls(model_id, source, tokens)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        context: dict[str, Any] = dict(self.special_tokens)
        context["add_generation_prompt"] = add_generation_prompt
        # A fresh copy every time: templates may mutate what they are given.
        context["messages"] = copy.deepcopy(list(messages))
        if tools:
            context["tools"] = copy.deepcopy(list(tools))
        # Client kwargs (enable_thinking, ...) may override add_generation_prompt, as in HF.
        context.update(copy.deepcopy(dict(template_kwargs or {})))
        try:
            rendered: str = self._env.render_template(_TEMPLATE_NAME, **context)
        except minijinja.TemplateError as exc:
            raise _template_error(self.model_id, exc) from exc
        return rendered

    def render_continuation(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt that continues the final (assistant) message: rendered without the
        generation prompt, then cut right after that message's content, so the end of its
        turn (`<|im_end|>`, ...) is left off and the model carries on from the last character.

        The cut is found with a marker appended to the content for this render: a template
        that strips or trims content (several do) would otherwise move or hide where the
        content ends, and an empty prefill would have nothing to find. Raises 400 when the
        template does not show the content (it drops or rewrites the final message)."""
        final = dict(messages[-1])
        content = final.get("content")
        text = content if isinstance(content, str) else ""
        final["content"] = text + CONTINUATION_MARKER
        kwargs = {**(template_kwargs or {}), "add_generation_prompt": False}
        rendered = self.render([*messages[:-1], final], tools=tools, template_kwargs=kwargs)
        cut = rendered.rfind(CONTINUATION_MARKER)
        if cut < 0:
            raise ApiError(
                400,
                f"the chat template of model '{self.model_id}' does not render the final "
                "assistant message's content, so it cannot be continued",
                code="template_render_failed",
                param="continue_final_message",
            )
        # Trimming sees the marker as the content's end, so trailing whitespace the client
        # sent stays before it: the model continues exactly after the prefilled text.
        return rendered[:cut]


IMAGE_PART_TYPES = ("image_url", "input_image", "image")


def _image_parts(parts: Sequence[Any], model_id: str) -> list[dict[str, Any]]:
    """A vision model's content parts as Qwen-VL style templates take them."""
    items: list[dict[str, Any]] = []
    for index, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind in IMAGE_PART_TYPES:
            items.append({"type": "image"})
        else:
            items.append({"type": "text", "text": _content_text([part], model_id, offset=index)})
    return items


def _content_text(parts: Sequence[Any], model_id: str, *, offset: int = 0) -> str:
    texts: list[str] = []
    for index, part in enumerate(parts, start=offset):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind in IMAGE_PART_TYPES:
            raise ApiError(
                400,
                f"model '{model_id}' does not support image input",
                code="vision_unsupported",
                extras={
                    "model_id": model_id,
                    "suggestion": "load a vision-capable model or remove image_url content parts",
                },
            )
        if kind in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            raise ApiError(
                400,
                f"unsupported content part type {kind!r}; expected 'text'",
                code="invalid_request_body",
                param=f"content[{index}]",
            )
    return "\n".join(texts)


def _arguments_object(arguments: Any) -> Any:
    # Templates iterate `arguments | items`; OpenAI sends them as a JSON string.
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def has_image(content: Any) -> bool:
    return isinstance(content, list) and any(
        isinstance(part, Mapping) and part.get("type") in IMAGE_PART_TYPES for part in content
    )


def template_messages(
    messages: Sequence[Mapping[str, Any]], model_id: str, *, images: bool = False
) -> list[dict[str, Any]]:
    """OpenAI messages (plain dicts) -> what chat templates expect, with every extra field
    kept; `images`: the model takes image parts (else they are a 400 vision_unsupported)."""
    prepared: list[dict[str, Any]] = []
    for message in messages:
        item = {key: value for key, value in message.items() if value is not None}
        content = message.get("content")
        if images and isinstance(content, list) and has_image(content):
            item["content"] = _image_parts(content, model_id)
        elif isinstance(content, list):
            item["content"] = _content_text(content, model_id)
        elif content is None:
            item["content"] = ""
        if isinstance(message.get("tool_calls"), list):
            calls = []
            for call in message["tool_calls"]:
                call = dict(call)
                function = dict(call.get("function") or {})
                if "arguments" in function:
                    function["arguments"] = _arguments_object(function["arguments"])
                call["function"] = function
                calls.append(call)
            item["tool_calls"] = calls
        prepared.append(item)
    return prepared


def with_tool_instructions(
    messages: Sequence[Mapping[str, Any]],
    instructions: str | None,
    format_call: Callable[[Mapping[str, Any]], str],
) -> list[dict[str, Any]]:
    """Template messages for a template without tools: the tool instructions (if any fit) in
    the system message, earlier calls written out as the assistant's text (`format_call`),
    tool results as user turns (templates that know no `tool` role often refuse it)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        item = dict(message)
        calls = item.pop("tool_calls", None)
        if calls:
            written = "\n".join(format_call(call) for call in calls)
            item["content"] = "\n".join(part for part in (item.get("content") or "", written) if part)
        if item.get("role") == "tool":
            item = {"role": "user", "content": f"Tool result:\n{item.get('content') or ''}"}
        out.append(item)
    if instructions is None:
        return out
    if out and out[0].get("role") == "system":
        out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{instructions}".strip()}
    else:
        out.insert(0, {"role": "system", "content": instructions})
    return out
