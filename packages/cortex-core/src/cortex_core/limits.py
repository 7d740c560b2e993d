"""Cheap refusals of absurd request bodies, decided before any real work (pure functions).

A body can be valid JSON and still take a node down: nesting a thousand levels deep makes
every recursive decoder and walker (msgspec, Jinja, our own converters) raise
RecursionError, and a million tiny messages cost seconds of templating and tokenising.
These checks run on the raw bytes at C speed (a regex, `bytes.translate`, msgspec skipping
values it does not need) and raise a 400 that names the limit, so the caller learns which
setting refused it.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate

import msgspec

from cortex_core.errors import ApiError, bad_request

# Deeper than any real request (a tool schema nests a few dozen levels at most), and far
# below the ~1000 frames where recursive decoders give up with RecursionError.
MAX_JSON_DEPTH = 128
# Names and ids echoed in error messages are cut to this many characters.
MAX_ECHOED_CHARS = 120

# Every byte but the structure that matters for nesting: quotes and brackets.
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')
# A string in what is left (only quotes and brackets remain, escapes are gone).
_QUOTED = re.compile(rb'"[^"]*"')
# Opening brackets step the depth up by one, closing ones (0xff: -1 as a signed byte) down.
_DEPTH_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


def json_depth_exceeds(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text in `body` nests containers deeper than `limit`.

    Brackets inside strings do not count. Malformed JSON is judged as far as its brackets
    go; the decoder that runs next reports what is malformed. Everything but the final sum
    runs in C over the whole body (a 30 MB body of a million messages: ~0.1 s on one core): escapes
    are dropped, then every byte but quotes and brackets, then adjacent quote pairs (an
    empty string, or the end of one and the start of the next: nothing between them
    counts), and only strings that hold brackets are left for a regex to remove.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False  # it cannot nest deeper than it opens
    if b"\\" in body:
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    structure = body.translate(None, _NOT_STRUCTURE)
    structure = structure.replace(b'""', b"")
    if b'"' in structure:
        structure = _QUOTED.sub(b"", structure)
    steps = array("b", structure.translate(_DEPTH_STEP, b'"'))
    return max(accumulate(steps), default=0) > limit


def too_deep(limit: int = MAX_JSON_DEPTH) -> ApiError:
    return bad_request(
        f"request body nests JSON deeper than {limit} levels, the limit for every request",
        code="json_too_deep",
    )


def echoed(name: str, limit: int = MAX_ECHOED_CHARS) -> str:
    """`name` as it may appear in an error message: cut, saying how much was cut."""
    if len(name) <= limit:
        return name
    return f"{name[:limit]}... ({len(name) - limit} more characters)"


@dataclass(frozen=True, slots=True)
class PromptLimits:
    """How large a conversation one model accepts; `setting` names where each is configured,
    e.g. "max_messages in neuron.toml", with `{key}` standing for the key."""

    max_messages: int
    max_prompt_bytes: int
    setting: str = "{key}"

    def named(self, key: str) -> str:
        return self.setting.format(key=key)


_NOTHING = msgspec.Raw(b"")


class _Conversation(msgspec.Struct):
    """The parts of any dialect's body that make up the prompt, left undecoded (Raw: absent
    is empty, since msgspec reads `Raw | None` as "null only")."""

    model: str = ""
    messages: list[msgspec.Raw] | None = None  # chat, Anthropic messages, count_tokens
    input: str | list[msgspec.Raw] | None = None  # Responses
    prompt: msgspec.Raw = _NOTHING  # completions
    system: msgspec.Raw = _NOTHING  # Anthropic
    instructions: msgspec.Raw = _NOTHING  # Responses


_CONVERSATION = msgspec.json.Decoder(_Conversation)


@dataclass(frozen=True, slots=True)
class PromptSize:
    model: str
    messages: int
    prompt_bytes: int


def prompt_size(body: bytes) -> PromptSize | None:
    """The model, message count and prompt bytes (the conversation's JSON as sent) of a
    request body; None when it is not a request object (the handler's own decode says why)."""
    try:
        conversation = _CONVERSATION.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    messages = conversation.messages or []
    items = conversation.input if isinstance(conversation.input, list) else []
    size = sum(len(raw) for raw in messages) + sum(len(raw) for raw in items)
    if isinstance(conversation.input, str):
        size += len(conversation.input)
    size += len(conversation.prompt) + len(conversation.system) + len(conversation.instructions)
    return PromptSize(conversation.model, len(messages) + len(items), size)


def check_prompt(size: PromptSize, limits: PromptLimits) -> None:
    """Raise the 400 naming the limit `size` breaks, if any."""
    if size.messages > limits.max_messages:
        raise bad_request(
            f"the conversation has {size.messages} messages; this model accepts at most "
            f"{limits.max_messages} ({limits.named('max_messages')})",
            code="too_many_messages",
            param="messages",
        )
    if size.prompt_bytes > limits.max_prompt_bytes:
        raise bad_request(
            f"the conversation is {size.prompt_bytes} bytes; this model accepts at most "
            f"{limits.max_prompt_bytes} ({limits.named('max_prompt_bytes')})",
            code="prompt_too_large",
            param="messages",
        )


def prompt_check(limits_for: Callable[[str], PromptLimits]) -> Callable[[bytes], None]:
    """A body check for BodyGuard: the prompt limits of the body's model."""

    def check(body: bytes) -> None:
        size = prompt_size(body)
        if size is not None:
            check_prompt(size, limits_for(size.model))

    return check
