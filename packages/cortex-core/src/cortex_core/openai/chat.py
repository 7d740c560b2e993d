"""OpenAI Chat Completions wire types (`POST /v1/chat/completions`).

Names follow the OpenAI API reference and the official SDK (`openai/types/chat`), minus the
SDK's `Param` suffix. Unknown fields are ignored on decode (clients send many we do not use);
known fields are typed strictly, so `"temperature": "hot"` is a 400 that names the field.
Optional fields default to UNSET so that decode → encode gives back the same JSON.

Our extensions, all common among local servers (vLLM, SGLang, llama.cpp): `top_k`, `min_p`,
`repetition_penalty`, `repeat_last_n`, `chat_template_kwargs`, `continue_final_message`,
`add_generation_prompt` on the request;
`reasoning_content` / `reasoning` on assistant messages and deltas; `stop_reason` on a choice
(vLLM's name: the stop string or token id that ended the choice, when one did).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from cortex_core.wire import UNSET, Maybe


class _Wire(msgspec.Struct, kw_only=True):
    # Classes with a required field after a defaulted one repeat `kw_only=True`: msgspec
    # inherits it, mypy does not see it inherited.
    pass


# --- content parts -----------------------------------------------------------------------


class ChatCompletionContentPartText(_Wire, tag_field="type", tag="text"):
    text: str


class ImageURL(_Wire):
    url: str
    detail: Maybe[Literal["auto", "low", "high", "original"]] = UNSET


class ChatCompletionContentPartImage(_Wire, tag_field="type", tag="image_url"):
    image_url: ImageURL


class ChatCompletionContentPartRefusal(_Wire, tag_field="type", tag="refusal"):
    refusal: str


ChatCompletionContentPart = ChatCompletionContentPartText | ChatCompletionContentPartImage
AssistantContentPart = ChatCompletionContentPartText | ChatCompletionContentPartRefusal


# --- messages --------------------------------------------------------------------------


class Function(_Wire):
    """The function a tool call invokes; `arguments` is a JSON document in a string."""

    name: str
    arguments: str


class ChatCompletionMessageToolCall(_Wire, kw_only=True):
    id: str
    type: Literal["function"] = "function"
    function: Function


class ChatCompletionSystemMessage(_Wire, tag_field="role", tag="system"):
    content: str | list[ChatCompletionContentPartText]
    name: Maybe[str] = UNSET


class ChatCompletionDeveloperMessage(_Wire, tag_field="role", tag="developer"):
    content: str | list[ChatCompletionContentPartText]
    name: Maybe[str] = UNSET


class ChatCompletionUserMessage(_Wire, tag_field="role", tag="user"):
    content: str | list[ChatCompletionContentPart]
    name: Maybe[str] = UNSET


class ChatCompletionAssistantMessage(_Wire, tag_field="role", tag="assistant"):
    # Null or absent on a turn that only calls tools.
    content: Maybe[str | list[AssistantContentPart]] = UNSET
    reasoning_content: Maybe[str] = UNSET
    reasoning: Maybe[str] = UNSET
    tool_calls: Maybe[list[ChatCompletionMessageToolCall]] = UNSET
    refusal: Maybe[str] = UNSET
    name: Maybe[str] = UNSET


class ChatCompletionToolMessage(_Wire, tag_field="role", tag="tool"):
    content: str | list[ChatCompletionContentPartText]
    tool_call_id: str


ChatCompletionMessageParam = (
    ChatCompletionSystemMessage
    | ChatCompletionDeveloperMessage
    | ChatCompletionUserMessage
    | ChatCompletionAssistantMessage
    | ChatCompletionToolMessage
)


# --- tools and output format -------------------------------------------------------------------


class FunctionDefinition(_Wire):
    name: str
    description: Maybe[str] = UNSET
    parameters: Maybe[dict[str, Any]] = UNSET
    strict: Maybe[bool] = UNSET


class ChatCompletionFunctionTool(_Wire, kw_only=True):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Wire):
    name: str


class ChatCompletionNamedToolChoice(_Wire, kw_only=True):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoiceOption = Literal["none", "auto", "required"] | ChatCompletionNamedToolChoice


class ResponseFormatText(_Wire, tag_field="type", tag="text"):
    pass


class ResponseFormatJSONObject(_Wire, tag_field="type", tag="json_object"):
    pass


class JSONSchema(_Wire):
    name: str
    description: Maybe[str] = UNSET
    schema: Maybe[dict[str, Any]] = UNSET
    strict: Maybe[bool] = UNSET


class ResponseFormatJSONSchema(_Wire, tag_field="type", tag="json_schema"):
    json_schema: JSONSchema


ResponseFormat = ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema


class ChatCompletionStreamOptions(_Wire):
    include_usage: Maybe[bool] = UNSET
    include_obfuscation: Maybe[bool] = UNSET
    # vLLM's extension: every chunk carries the usage so far (prompt and cached tokens from
    # the first chunk on), not only the last one.
    continuous_usage_stats: Maybe[bool] = UNSET


ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


class ChatCompletionRequest(_Wire):
    model: str
    messages: list[ChatCompletionMessageParam]
    stream: Maybe[bool] = UNSET
    stream_options: Maybe[ChatCompletionStreamOptions] = UNSET
    max_tokens: Maybe[int] = UNSET
    max_completion_tokens: Maybe[int] = UNSET
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
    logprobs: Maybe[bool] = UNSET
    top_logprobs: Maybe[int] = UNSET
    tools: Maybe[list[ChatCompletionFunctionTool]] = UNSET
    tool_choice: Maybe[ToolChoiceOption] = UNSET
    parallel_tool_calls: Maybe[bool] = UNSET
    response_format: Maybe[ResponseFormat] = UNSET
    reasoning_effort: Maybe[ReasoningEffort] = UNSET
    chat_template_kwargs: Maybe[dict[str, Any]] = UNSET
    # vLLM's: render the template without the generation prompt, with the final (assistant)
    # message left open, and continue it (Anthropic's assistant prefill arrives this way).
    continue_final_message: Maybe[bool] = UNSET
    add_generation_prompt: Maybe[bool] = UNSET
    user: Maybe[str] = UNSET
    metadata: Maybe[dict[str, str]] = UNSET
    store: Maybe[bool] = UNSET
    service_tier: Maybe[str] = UNSET


# --- responses -------------------------------------------------------------------------------


class PromptTokensDetails(_Wire):
    cached_tokens: Maybe[int] = UNSET
    audio_tokens: Maybe[int] = UNSET


class CompletionTokensDetails(_Wire):
    reasoning_tokens: Maybe[int] = UNSET
    audio_tokens: Maybe[int] = UNSET
    accepted_prediction_tokens: Maybe[int] = UNSET
    rejected_prediction_tokens: Maybe[int] = UNSET


class CompletionUsage(_Wire):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: Maybe[PromptTokensDetails] = UNSET
    completion_tokens_details: Maybe[CompletionTokensDetails] = UNSET


class TopLogprob(_Wire):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionTokenLogprob(_Wire):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = msgspec.field(default_factory=list)


class ChoiceLogprobs(_Wire):
    content: list[ChatCompletionTokenLogprob] | None = None
    refusal: list[ChatCompletionTokenLogprob] | None = None


class ChatCompletionMessage(_Wire):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: Maybe[str] = UNSET
    reasoning: Maybe[str] = UNSET
    tool_calls: Maybe[list[ChatCompletionMessageToolCall]] = UNSET
    refusal: Maybe[str] = UNSET


class Choice(_Wire, kw_only=True):
    index: int = 0
    message: ChatCompletionMessage
    # A string rather than the documented Literal: a local server may add reasons ("abort").
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None
    stop_reason: Maybe[str | int] = UNSET


class ChatCompletion(_Wire):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = 0
    model: str = ""
    choices: list[Choice] = msgspec.field(default_factory=list)
    usage: Maybe[CompletionUsage] = UNSET
    system_fingerprint: Maybe[str] = UNSET


# --- streaming ------------------------------------------------------------------------------


class ChoiceDeltaToolCallFunction(_Wire):
    name: Maybe[str] = UNSET
    arguments: Maybe[str] = UNSET


class ChoiceDeltaToolCall(_Wire):
    index: int
    id: Maybe[str] = UNSET
    type: Maybe[Literal["function"]] = UNSET
    function: Maybe[ChoiceDeltaToolCallFunction] = UNSET


class ChoiceDelta(_Wire):
    role: Maybe[Literal["developer", "system", "user", "assistant", "tool"]] = UNSET
    content: Maybe[str] = UNSET
    reasoning_content: Maybe[str] = UNSET
    reasoning: Maybe[str] = UNSET
    tool_calls: Maybe[list[ChoiceDeltaToolCall]] = UNSET
    refusal: Maybe[str] = UNSET


class ChunkChoice(_Wire, kw_only=True):
    index: int = 0
    delta: ChoiceDelta
    finish_reason: str | None = None
    logprobs: Maybe[ChoiceLogprobs] = UNSET
    stop_reason: Maybe[str | int] = UNSET


class ChatCompletionChunk(_Wire):
    """One `data:` payload of a streamed chat completion.

    Lenient where upstreams differ: everything but `choices[].delta` has a default. The last
    chunk of a stream with `stream_options.include_usage` has `choices: []` and the usage.
    """

    id: str = ""
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = 0
    model: str = ""
    choices: list[ChunkChoice] = msgspec.field(default_factory=list)
    usage: Maybe[CompletionUsage] = UNSET
    system_fingerprint: Maybe[str] = UNSET
