"""Refusals in Anthropic's words: pure functions from a neuron's structured error to the
message an Anthropic client expects (docs/dialects.md, "Errors on /v1/messages").

The neuron serves the internal chat request, so its refusals name chat fields and use
vLLM's wording (which the OpenAI paths keep). Anthropic clients key behaviour on Anthropic's
own wording: Claude Code, for one, lowers `max_tokens` and retries when it reads
"input length and `max_tokens` exceed context limit: a + b > c", and offers to compact the
conversation on "prompt is too long". The neuron therefore sends the numbers as fields of
its error (`prompt_len`, `max_tokens`, `max`), and these functions word them; no message
text is parsed.
"""

from __future__ import annotations

from dataclasses import dataclass

CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"

# Chat fields the converter fills from Anthropic fields of another name (docs/dialects.md):
# a refusal names what the caller sent, not what we made of it.
_ANTHROPIC_FIELD_NAMES = {"response_format": "output_config.format"}


@dataclass(frozen=True, slots=True)
class ContextOverflow:
    """The numbers of a context-limit refusal: prompt tokens, the requested output, the limit."""

    prompt_tokens: int
    max_tokens: int | None
    limit: int


def context_limit_message(overflow: ContextOverflow) -> str:
    """Anthropic's wording of a context overflow, byte for byte but for the numbers.

    "prompt is too long" when the prompt alone exceeds the limit; otherwise the sum of the
    prompt and `max_tokens` does, and the message says so with both numbers.
    """
    prompt, limit = overflow.prompt_tokens, overflow.limit
    if overflow.max_tokens is None or prompt > limit:
        return f"prompt is too long: {prompt} tokens > {limit} maximum"
    return (
        f"input length and `max_tokens` exceed context limit: {prompt} + {overflow.max_tokens} > {limit}, "
        "decrease input length or `max_tokens` and try again"
    )


def anthropic_field_message(chat_param: str | None, message: str) -> str:
    """A neuron's refusal that starts with the chat field's name, renamed to the Anthropic
    field it came from (`response_format: ...` -> `output_config.format: ...`)."""
    name = _ANTHROPIC_FIELD_NAMES.get(chat_param or "")
    if name is None or chat_param is None or not message.startswith(chat_param):
        return message
    return name + message[len(chat_param) :]
