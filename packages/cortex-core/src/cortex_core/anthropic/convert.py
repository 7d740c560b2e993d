"""Anthropic Messages ⇄ OpenAI chat: pure conversion of requests and whole responses.

The internal form is the OpenAI chat request (DESIGN.md §3), so `/v1/messages` is served by
`messages_request_to_chat` on the way in and `message_from_chat_completion` on the way out
(`stream.AnthropicStreamConverter` for streams). Decisions, also in docs/dialects.md:

- One system message, first: the top-level `system` and every `role: "system"` message, joined
  with a blank line (chat templates reject a system message anywhere else).
- Text blocks of one message join with "\\n" into a string (templates drop list content);
  a message with images keeps a parts list.
- `tool_result` blocks become `role: "tool"` messages placed before the rest of their user
  message; `is_error` prefixes the text with "Error: ". Tool-call arguments travel as the
  JSON string the OpenAI spec prescribes (the neuron parses them for templates that want a
  mapping).
- Thinking blocks become the assistant's `reasoning_content`, never text; redacted thinking is
  dropped (it is opaque to a local model). `thinking` maps to
  `chat_template_kwargs.enable_thinking` (+ `thinking_budget`).
- Arguments a model produced that are not a JSON object become `{"_raw": "<arguments>"}`, so
  the client gets a tool call it can reject with a message the model sees, not a crash.
- A final assistant message is a prefill: `continue_final_message: true,
  add_generation_prompt: false`, so the answer (only the continuation) carries that turn on.
"""

from __future__ import annotations

from typing import Any

import msgspec

from cortex_core.anthropic.messages import (
    Base64ImageSource,
    ContentBlock,
    ContentBlockParam,
    CountTokensRequest,
    ImageBlockParam,
    Message,
    MessageParam,
    MessagesRequest,
    RedactedThinkingBlockParam,
    StopReason,
    TextBlock,
    TextBlockParam,
    ThinkingBlock,
    ThinkingBlockParam,
    ThinkingConfigAdaptive,
    ThinkingConfigDisabled,
    ThinkingConfigEnabled,
    ToolChoiceAny,
    ToolChoiceAuto,
    ToolChoiceNone,
    ToolChoiceTool,
    ToolParam,
    ToolResultBlockParam,
    ToolUseBlock,
    ToolUseBlockParam,
    Usage,
)
from cortex_core.errors import ApiError, bad_request
from cortex_core.openai.chat import (
    ChatCompletion,
    ChatCompletionAssistantMessage,
    ChatCompletionContentPart,
    ChatCompletionContentPartImage,
    ChatCompletionContentPartText,
    ChatCompletionFunctionTool,
    ChatCompletionMessageParam,
    ChatCompletionMessageToolCall,
    ChatCompletionNamedToolChoice,
    ChatCompletionRequest,
    ChatCompletionStreamOptions,
    ChatCompletionSystemMessage,
    ChatCompletionToolMessage,
    ChatCompletionUserMessage,
    CompletionUsage,
    Function,
    FunctionDefinition,
    ImageURL,
    JSONSchema,
    NamedFunction,
    ResponseFormatJSONSchema,
    ToolChoiceOption,
)
from cortex_core.wire import Maybe, given

SYSTEM_SEPARATOR = "\n\n"
BLOCK_SEPARATOR = "\n"
TOOL_ERROR_PREFIX = "Error: "


def _unsupported(path: str, what: str) -> ApiError:
    return bad_request(f"{path}: {what}", code="unsupported_content", param=path)


# --- request: Anthropic → OpenAI chat --------------------------------------------------------


def check_messages_request(request: MessagesRequest | CountTokensRequest) -> None:
    """Anthropic's own bounds, checked before anything is placed or loaded: a request the
    Messages API would refuse is refused here too, with a 400 naming the field, rather than
    being passed on to a sampler that would accept it (temperature 1.5 is valid in OpenAI's
    dialect, not in Anthropic's)."""
    if not request.messages:
        raise bad_request("messages: at least one message is required", param="messages")
    if not isinstance(request, MessagesRequest):
        return
    if request.max_tokens < 1:
        raise bad_request(f"max_tokens: must be at least 1, got {request.max_tokens}", param="max_tokens")
    for name, value in (("temperature", given(request.temperature)), ("top_p", given(request.top_p))):
        if value is not None and not 0 <= value <= 1:
            raise bad_request(f"{name}: must be between 0 and 1, got {value:g}", param=name)
    top_k = given(request.top_k)
    if top_k is not None and top_k < 0:
        raise bad_request(f"top_k: must be 0 or more, got {top_k}", param="top_k")


def messages_request_to_chat(request: MessagesRequest) -> ChatCompletionRequest:
    """The chat request that serves an Anthropic Messages request. Raises ApiError(400)."""
    check_messages_request(request)
    chat = _prompt_to_chat(request)
    chat.max_tokens = request.max_tokens
    chat.temperature = request.temperature
    chat.top_p = request.top_p
    chat.top_k = request.top_k
    if request.stop_sequences:
        chat.stop = list(request.stop_sequences)
    if request.stream:
        chat.stream = True
        # Anthropic reports usage at the end of every stream, and the input tokens already in
        # message_start; OpenAI only when asked, and only at the end unless usage is continuous.
        chat.stream_options = ChatCompletionStreamOptions(include_usage=True, continuous_usage_stats=True)
    return chat


def count_tokens_request_to_chat(request: CountTokensRequest) -> ChatCompletionRequest:
    """The chat request whose rendered prompt `/v1/messages/count_tokens` measures."""
    check_messages_request(request)
    return _prompt_to_chat(request)


def _prompt_to_chat(request: MessagesRequest | CountTokensRequest) -> ChatCompletionRequest:
    system_parts: list[str] = []
    if isinstance(request.system, str):
        system_parts.append(request.system)
    elif isinstance(request.system, list):
        system_parts.append(BLOCK_SEPARATOR.join(block.text for block in request.system))
    converted: list[ChatCompletionMessageParam] = []
    for i, message in enumerate(request.messages):
        path = f"messages[{i}]"
        if message.role == "system":
            system_parts.append(_system_text(message.content, path))
        elif message.role == "user":
            converted.extend(_user_message(message, path))
        else:
            converted.append(_assistant_message(message, path))
    system_text = SYSTEM_SEPARATOR.join(part for part in system_parts if part)
    if system_text:
        converted.insert(0, ChatCompletionSystemMessage(content=system_text))

    chat = ChatCompletionRequest(model=request.model, messages=converted)
    if request.messages[-1].role == "assistant":
        # Prefill: the answer continues the assistant's final message (vLLM's request fields;
        # the neuron renders the template without the generation prompt, the turn left open).
        chat.continue_final_message = True
        chat.add_generation_prompt = False
    if request.tools:
        chat.tools = [_tool(tool, f"tools[{i}]") for i, tool in enumerate(request.tools)]
    _apply_tool_choice(chat, request)
    _apply_thinking(chat, request)
    if request.output_config:
        config = request.output_config
        if config.effort:
            chat.reasoning_effort = config.effort
        if config.format:
            chat.response_format = ResponseFormatJSONSchema(
                json_schema=JSONSchema(name="output", schema=config.format.schema)
            )
    return chat


def _system_text(content: str | list[ContentBlockParam], path: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for j, block in enumerate(content):
        if not isinstance(block, TextBlockParam):
            raise _unsupported(f"{path}.content[{j}]", "a system message may only hold text blocks")
        texts.append(block.text)
    return BLOCK_SEPARATOR.join(texts)


def _user_message(message: MessageParam, path: str) -> list[ChatCompletionMessageParam]:
    if isinstance(message.content, str):
        return [ChatCompletionUserMessage(content=message.content)]
    tool_messages: list[ChatCompletionMessageParam] = []
    parts: list[ChatCompletionContentPart] = []
    for j, block in enumerate(message.content):
        block_path = f"{path}.content[{j}]"
        if isinstance(block, TextBlockParam):
            parts.append(ChatCompletionContentPartText(text=block.text))
        elif isinstance(block, ImageBlockParam):
            parts.append(_image_part(block))
        elif isinstance(block, ToolResultBlockParam):
            tool_messages.append(_tool_message(block, block_path))
        else:
            raise _unsupported(
                block_path, f"a `{_block_type(block)}` block is only valid in an assistant message"
            )
    # Tool results answer the previous assistant turn, so they come before any new user text.
    if not parts:
        return tool_messages
    return [*tool_messages, ChatCompletionUserMessage(content=_collapse(parts))]


def _collapse(parts: list[ChatCompletionContentPart]) -> str | list[ChatCompletionContentPart]:
    if all(isinstance(part, ChatCompletionContentPartText) for part in parts):
        return BLOCK_SEPARATOR.join(
            part.text for part in parts if isinstance(part, ChatCompletionContentPartText)
        )
    return parts


def _image_part(block: ImageBlockParam) -> ChatCompletionContentPartImage:
    source = block.source
    if isinstance(source, Base64ImageSource):
        url = f"data:{source.media_type};base64,{source.data}"
    else:
        url = source.url
    return ChatCompletionContentPartImage(image_url=ImageURL(url=url))


def _tool_message(block: ToolResultBlockParam, path: str) -> ChatCompletionToolMessage:
    content = given(block.content)
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        texts = []
        for k, inner in enumerate(content):
            if not isinstance(inner, TextBlockParam):
                raise _unsupported(
                    f"{path}.content[{k}]",
                    "images inside tool_result are not supported; put the image in a user text turn",
                )
            texts.append(inner.text)
        text = BLOCK_SEPARATOR.join(texts)
    if block.is_error:
        text = TOOL_ERROR_PREFIX + text
    return ChatCompletionToolMessage(content=text, tool_call_id=block.tool_use_id)


def _assistant_message(message: MessageParam, path: str) -> ChatCompletionAssistantMessage:
    if isinstance(message.content, str):
        return ChatCompletionAssistantMessage(content=message.content)
    texts: list[str] = []
    reasoning: list[str] = []
    tool_calls: list[ChatCompletionMessageToolCall] = []
    for j, block in enumerate(message.content):
        if isinstance(block, TextBlockParam):
            texts.append(block.text)
        elif isinstance(block, ThinkingBlockParam):
            reasoning.append(block.thinking)
        elif isinstance(block, RedactedThinkingBlockParam):
            continue
        elif isinstance(block, ToolUseBlockParam):
            arguments = msgspec.json.encode(block.input).decode()
            tool_calls.append(
                ChatCompletionMessageToolCall(
                    id=block.id, function=Function(name=block.name, arguments=arguments)
                )
            )
        else:
            raise _unsupported(
                f"{path}.content[{j}]", f"a `{_block_type(block)}` block is not valid in an assistant message"
            )
    # "" rather than null: several chat templates test `'</think>' in message.content`.
    assistant = ChatCompletionAssistantMessage(content=BLOCK_SEPARATOR.join(texts))
    if reasoning:
        assistant.reasoning_content = BLOCK_SEPARATOR.join(reasoning)
    if tool_calls:
        assistant.tool_calls = tool_calls
    return assistant


def _block_type(block: ContentBlockParam) -> str:
    return str(block.__struct_config__.tag)


def _tool(tool: ToolParam, path: str) -> ChatCompletionFunctionTool:
    kind = given(tool.type)
    if kind not in (None, "custom"):
        raise _unsupported(
            f"{path}.type",
            f"server tool `{kind}` is not supported; only client tools with an input_schema are",
        )
    schema = given(tool.input_schema)
    if schema is None:
        raise bad_request(f"{path}.input_schema is required", param=f"{path}.input_schema")
    return ChatCompletionFunctionTool(
        function=FunctionDefinition(
            name=tool.name, description=tool.description, parameters=schema, strict=tool.strict
        )
    )


def _apply_tool_choice(chat: ChatCompletionRequest, request: MessagesRequest | CountTokensRequest) -> None:
    choice = given(request.tool_choice)
    if choice is None:
        return
    mapped: ToolChoiceOption
    if isinstance(choice, ToolChoiceAuto):
        mapped = "auto"
    elif isinstance(choice, ToolChoiceAny):
        mapped = "required"
    elif isinstance(choice, ToolChoiceTool):
        mapped = ChatCompletionNamedToolChoice(function=NamedFunction(name=choice.name))
    else:
        assert isinstance(choice, ToolChoiceNone)
        mapped = "none"
    chat.tool_choice = mapped
    if not isinstance(choice, ToolChoiceNone) and choice.disable_parallel_tool_use:
        chat.parallel_tool_calls = False


def _apply_thinking(chat: ChatCompletionRequest, request: MessagesRequest | CountTokensRequest) -> None:
    thinking = given(request.thinking)
    kwargs: dict[str, Any]
    if isinstance(thinking, ThinkingConfigEnabled):
        kwargs = {"enable_thinking": True, "thinking_budget": thinking.budget_tokens}
    elif isinstance(thinking, ThinkingConfigAdaptive):
        kwargs = {"enable_thinking": True}
    elif isinstance(thinking, ThinkingConfigDisabled):
        kwargs = {"enable_thinking": False}
    else:
        return
    chat.chat_template_kwargs = kwargs


# --- response: OpenAI chat → Anthropic ------------------------------------------------------


def message_from_chat_completion(completion: ChatCompletion, *, model: str | None = None) -> Message:
    """The Anthropic `Message` for a chat completion (its first choice).

    `model` overrides the upstream's model name (e.g. to echo what the client asked for).
    """
    usage = anthropic_usage(given(completion.usage))
    message = Message(id=anthropic_message_id(completion.id), model=model or completion.model, usage=usage)
    if not completion.choices:
        message.stop_reason = "end_turn"
        return message
    choice = completion.choices[0]
    reply = choice.message
    content: list[ContentBlock] = []
    reasoning = reasoning_text(reply.reasoning_content, reply.reasoning)
    if reasoning:
        content.append(ThinkingBlock(thinking=reasoning))
    if reply.content:
        content.append(TextBlock(text=reply.content))
    for call in given(reply.tool_calls) or []:
        content.append(
            ToolUseBlock(id=call.id, name=call.function.name, input=tool_input(call.function.arguments))
        )
    message.content = content
    message.stop_reason, message.stop_sequence = anthropic_stop_reason(
        choice.finish_reason, choice.stop_reason, used_tools=bool(given(reply.tool_calls))
    )
    return message


def reasoning_text(reasoning_content: Maybe[str], reasoning: Maybe[str]) -> str | None:
    """Reasoning from either field. Servers that fill both (ours does) send the same text,
    so `reasoning_content` wins rather than the two being concatenated."""
    return given(reasoning_content) or given(reasoning) or None


def anthropic_message_id(upstream_id: str) -> str:
    if upstream_id.startswith("msg_"):
        return upstream_id
    return "msg_" + (upstream_id or "cortex")


def tool_input(arguments: str) -> dict[str, Any]:
    """Tool-call arguments as the object Anthropic's `input` must be (see module docstring)."""
    if not arguments.strip():
        return {}
    try:
        parsed = msgspec.json.decode(arguments)
    except msgspec.DecodeError:
        return {"_raw": arguments}
    return parsed if isinstance(parsed, dict) else {"_raw": arguments}


def anthropic_stop_reason(
    finish_reason: str | None, matched_stop: Maybe[str | int], *, used_tools: bool
) -> tuple[StopReason, str | None]:
    """(stop_reason, stop_sequence) for an OpenAI finish_reason.

    `matched_stop` is the choice's `stop_reason` (vLLM's field, which our neuron fills): the
    stop string that ended generation, or a stop token id. Only a string is a stop_sequence.
    """
    if finish_reason == "length":
        return "max_tokens", None
    if finish_reason == "content_filter":
        return "refusal", None
    if used_tools or finish_reason in ("tool_calls", "function_call"):
        return "tool_use", None
    if isinstance(matched_stop, str):
        return "stop_sequence", matched_stop
    return "end_turn", None


def anthropic_usage(usage: CompletionUsage | None) -> Usage:
    """Anthropic counts cache reads apart from `input_tokens` (total = input + cache reads)."""
    if usage is None:
        return Usage()
    cached = _cached_tokens(usage)
    return Usage(
        input_tokens=max(0, usage.prompt_tokens - cached),
        output_tokens=usage.completion_tokens,
        cache_read_input_tokens=cached,
        cache_creation_input_tokens=0,
    )


def _cached_tokens(usage: CompletionUsage) -> int:
    details = given(usage.prompt_tokens_details)
    return (given(details.cached_tokens) or 0) if details else 0
