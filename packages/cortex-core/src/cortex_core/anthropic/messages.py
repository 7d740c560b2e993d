"""Anthropic Messages API wire types (`POST /v1/messages`, `/v1/messages/count_tokens`).

Names follow the official SDK (`anthropic/types`): request-side blocks keep the SDK's `Param`
suffix (`TextBlockParam`), response-side blocks do not (`TextBlock`). Unknown fields are
ignored; a content block or tool choice of a type we do not model fails to decode with a
400 naming its path (e.g. `$.messages[0].content[1].type`).

`temperature`, `top_p` and `top_k` are modelled although the current SDK no longer offers
them as arguments: clients (Claude Code among them) still send them.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from cortex_core.wire import UNSET, Maybe


class _Wire(msgspec.Struct, kw_only=True):
    # Classes with a required field after a defaulted one repeat `kw_only=True`: msgspec
    # inherits it, mypy does not see it inherited.
    pass


# --- request content blocks ----------------------------------------------------------------


class TextBlockParam(_Wire, tag_field="type", tag="text"):
    text: str
    cache_control: Maybe[dict[str, Any]] = UNSET
    citations: Maybe[list[dict[str, Any]]] = UNSET


class Base64ImageSource(_Wire, tag_field="type", tag="base64"):
    media_type: str
    data: str


class URLImageSource(_Wire, tag_field="type", tag="url"):
    url: str


class ImageBlockParam(_Wire, tag_field="type", tag="image"):
    source: Base64ImageSource | URLImageSource
    cache_control: Maybe[dict[str, Any]] = UNSET


class ToolUseBlockParam(_Wire, tag_field="type", tag="tool_use"):
    id: str
    name: str
    input: dict[str, Any]
    cache_control: Maybe[dict[str, Any]] = UNSET


class ToolResultBlockParam(_Wire, tag_field="type", tag="tool_result"):
    tool_use_id: str
    content: Maybe[str | list[TextBlockParam | ImageBlockParam]] = UNSET
    is_error: Maybe[bool] = UNSET
    cache_control: Maybe[dict[str, Any]] = UNSET


class ThinkingBlockParam(_Wire, tag_field="type", tag="thinking"):
    thinking: str
    signature: Maybe[str] = UNSET


class RedactedThinkingBlockParam(_Wire, tag_field="type", tag="redacted_thinking"):
    data: str


ContentBlockParam = (
    TextBlockParam
    | ImageBlockParam
    | ToolUseBlockParam
    | ToolResultBlockParam
    | ThinkingBlockParam
    | RedactedThinkingBlockParam
)


class MessageParam(_Wire):
    # "system" inside messages is accepted by the current API and merged into the system prompt.
    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlockParam]


# --- tools, tool choice, thinking ----------------------------------------------------------


class ToolParam(_Wire):
    """A client tool. `type` is absent or "custom" for those; Anthropic's server tools
    (`web_search_20250305`, `bash_20250124`, ...) decode too, so that the converter can refuse
    them by name instead of a puzzling "missing input_schema"."""

    name: str
    type: Maybe[str] = UNSET
    description: Maybe[str] = UNSET
    input_schema: Maybe[dict[str, Any]] = UNSET
    cache_control: Maybe[dict[str, Any]] = UNSET
    strict: Maybe[bool] = UNSET


class ToolChoiceAuto(_Wire, tag_field="type", tag="auto"):
    disable_parallel_tool_use: Maybe[bool] = UNSET


class ToolChoiceAny(_Wire, tag_field="type", tag="any"):
    disable_parallel_tool_use: Maybe[bool] = UNSET


class ToolChoiceTool(_Wire, tag_field="type", tag="tool"):
    name: str
    disable_parallel_tool_use: Maybe[bool] = UNSET


class ToolChoiceNone(_Wire, tag_field="type", tag="none"):
    pass


ToolChoice = ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone


class ThinkingConfigEnabled(_Wire, tag_field="type", tag="enabled"):
    budget_tokens: int
    display: Maybe[str] = UNSET


class ThinkingConfigDisabled(_Wire, tag_field="type", tag="disabled"):
    pass


class ThinkingConfigAdaptive(_Wire, tag_field="type", tag="adaptive"):
    display: Maybe[str] = UNSET


ThinkingConfig = ThinkingConfigEnabled | ThinkingConfigDisabled | ThinkingConfigAdaptive


class JSONOutputFormat(_Wire, tag_field="type", tag="json_schema"):
    schema: dict[str, Any]


class OutputConfig(_Wire):
    effort: Maybe[Literal["low", "medium", "high", "xhigh", "max"]] = UNSET
    format: Maybe[JSONOutputFormat] = UNSET


class Metadata(_Wire):
    user_id: Maybe[str] = UNSET


class MessagesRequest(_Wire):
    model: str
    max_tokens: int
    messages: list[MessageParam]
    system: Maybe[str | list[TextBlockParam]] = UNSET
    stream: Maybe[bool] = UNSET
    temperature: Maybe[float] = UNSET
    top_p: Maybe[float] = UNSET
    top_k: Maybe[int] = UNSET
    stop_sequences: Maybe[list[str]] = UNSET
    tools: Maybe[list[ToolParam]] = UNSET
    tool_choice: Maybe[ToolChoice] = UNSET
    thinking: Maybe[ThinkingConfig] = UNSET
    output_config: Maybe[OutputConfig] = UNSET
    metadata: Maybe[Metadata] = UNSET
    service_tier: Maybe[str] = UNSET
    cache_control: Maybe[dict[str, Any]] = UNSET


class CountTokensRequest(_Wire):
    model: str
    messages: list[MessageParam]
    system: Maybe[str | list[TextBlockParam]] = UNSET
    tools: Maybe[list[ToolParam]] = UNSET
    tool_choice: Maybe[ToolChoice] = UNSET
    thinking: Maybe[ThinkingConfig] = UNSET
    output_config: Maybe[OutputConfig] = UNSET


class CountTokensResponse(_Wire):
    input_tokens: int


# --- response --------------------------------------------------------------------------


class TextBlock(_Wire, tag_field="type", tag="text"):
    text: str
    citations: Maybe[list[dict[str, Any]]] = UNSET


class ThinkingBlock(_Wire, tag_field="type", tag="thinking"):
    thinking: str
    # Local models sign nothing; the field is required by the SDKs, so it is always sent.
    signature: str = ""


class RedactedThinkingBlock(_Wire, tag_field="type", tag="redacted_thinking"):
    data: str


class ToolUseBlock(_Wire, tag_field="type", tag="tool_use"):
    id: str
    name: str
    input: dict[str, Any] = msgspec.field(default_factory=dict)


ContentBlock = TextBlock | ThinkingBlock | RedactedThinkingBlock | ToolUseBlock

StopReason = Literal[
    "end_turn",
    "max_tokens",
    "stop_sequence",
    "tool_use",
    "pause_turn",
    "refusal",
    "model_context_window_exceeded",
]


class Usage(_Wire):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class Message(_Wire, kw_only=True):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    content: list[ContentBlock] = msgspec.field(default_factory=list)
    model: str
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None
    usage: Usage = msgspec.field(default_factory=Usage)


# --- stream events (`event: <type>` + `data: {..., "type": <type>}`) ----------------------------


class TextDelta(_Wire, tag_field="type", tag="text_delta"):
    text: str


class ThinkingDelta(_Wire, tag_field="type", tag="thinking_delta"):
    thinking: str


class InputJSONDelta(_Wire, tag_field="type", tag="input_json_delta"):
    partial_json: str


class SignatureDelta(_Wire, tag_field="type", tag="signature_delta"):
    signature: str


ContentBlockDelta = TextDelta | ThinkingDelta | InputJSONDelta | SignatureDelta


class MessageStartEvent(_Wire, tag_field="type", tag="message_start"):
    message: Message


class ContentBlockStartEvent(_Wire, tag_field="type", tag="content_block_start"):
    index: int
    content_block: ContentBlock


class ContentBlockDeltaEvent(_Wire, tag_field="type", tag="content_block_delta"):
    index: int
    delta: ContentBlockDelta


class ContentBlockStopEvent(_Wire, tag_field="type", tag="content_block_stop"):
    index: int


class MessageDelta(_Wire):
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None


class MessageDeltaUsage(_Wire):
    output_tokens: int
    input_tokens: Maybe[int] = UNSET
    cache_creation_input_tokens: Maybe[int] = UNSET
    cache_read_input_tokens: Maybe[int] = UNSET


class MessageDeltaEvent(_Wire, tag_field="type", tag="message_delta"):
    delta: MessageDelta
    usage: MessageDeltaUsage


class MessageStopEvent(_Wire, tag_field="type", tag="message_stop"):
    pass


class PingEvent(_Wire, tag_field="type", tag="ping"):
    pass


class ErrorDetail(_Wire):
    type: str
    message: str


class ErrorEvent(_Wire, tag_field="type", tag="error"):
    error: ErrorDetail


MessageStreamEvent = (
    MessageStartEvent
    | ContentBlockStartEvent
    | ContentBlockDeltaEvent
    | ContentBlockStopEvent
    | MessageDeltaEvent
    | MessageStopEvent
    | PingEvent
    | ErrorEvent
)
