"""OpenAI legacy Completions wire types (`POST /v1/completions`).

A streamed chunk has the same shape as the whole response (`object: "text_completion"`), as
the API reference says, so `CompletionChunk` is `Completion`.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from cortex_core.errors import bad_request
from cortex_core.openai.chat import ChatCompletionStreamOptions, CompletionUsage
from cortex_core.wire import UNSET, Maybe

# msgspec allows one array type per union, so the prompt's array forms share one element
# union; `prompt_texts_or_ids` checks the array is homogeneous.
PromptElement = str | int | list[int]


class CompletionRequest(msgspec.Struct, kw_only=True):
    model: str
    prompt: str | list[PromptElement]
    suffix: Maybe[str] = UNSET
    echo: Maybe[bool] = UNSET
    stream: Maybe[bool] = UNSET
    stream_options: Maybe[ChatCompletionStreamOptions] = UNSET
    max_tokens: Maybe[int] = UNSET
    temperature: Maybe[float] = UNSET
    top_p: Maybe[float] = UNSET
    top_k: Maybe[int] = UNSET
    min_p: Maybe[float] = UNSET
    presence_penalty: Maybe[float] = UNSET
    frequency_penalty: Maybe[float] = UNSET
    repetition_penalty: Maybe[float] = UNSET
    repeat_last_n: Maybe[int] = UNSET
    logit_bias: Maybe[dict[str, float]] = UNSET
    seed: Maybe[int] = UNSET
    stop: Maybe[str | list[str]] = UNSET
    n: Maybe[int] = UNSET
    best_of: Maybe[int] = UNSET
    logprobs: Maybe[int] = UNSET
    user: Maybe[str] = UNSET


def prompt_texts_or_ids(request: CompletionRequest) -> list[str] | list[list[int]]:
    """The prompts of a request: a list of texts or a list of token-id lists.

    `"a"` and `["a", "b"]` are texts; `[1, 2]` is one tokenised prompt; `[[1, 2], [3]]` several.
    A mixed array is a 400 naming `prompt`.
    """
    prompt = request.prompt
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("`prompt` must not be an empty array", param="prompt")
    if all(isinstance(p, str) for p in prompt):
        return [p for p in prompt if isinstance(p, str)]
    if all(isinstance(p, int) for p in prompt):
        return [[p for p in prompt if isinstance(p, int)]]
    if all(isinstance(p, list) for p in prompt):
        return [p for p in prompt if isinstance(p, list)]
    raise bad_request(
        "`prompt` must be a string, an array of strings, an array of token ids or an array of "
        "token-id arrays; this array mixes them",
        param="prompt",
    )


class CompletionLogprobs(msgspec.Struct, kw_only=True):
    tokens: list[str] | None = None
    token_logprobs: list[float | None] | None = None
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int] | None = None


class CompletionChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None
    stop_reason: Maybe[str | int] = UNSET


class Completion(msgspec.Struct, kw_only=True):
    id: str = ""
    object: Literal["text_completion"] = "text_completion"
    created: int = 0
    model: str = ""
    choices: list[CompletionChoice] = msgspec.field(default_factory=list)
    usage: Maybe[CompletionUsage] = UNSET
    system_fingerprint: Maybe[str] = UNSET


CompletionChunk = Completion

__all__ = [
    "Completion",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionLogprobs",
    "CompletionRequest",
    "prompt_texts_or_ids",
]
