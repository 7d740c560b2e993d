"""OpenAI Responses ⇄ chat: pure conversion of requests and whole responses.

The neuron serves `/v1/responses` on its chat path: `responses_request_to_chat` in,
`response_from_chat_completion` out (`responses_stream.ResponsesStreamConverter` for streams).
Decisions, also in docs/dialects.md:

- Stateless: `previous_response_id` is a 400 (send the whole conversation in `input`).
- `instructions` becomes a leading system message; a string `input` one user message.
- A `function_call` item joins the assistant message just before it (one chat turn holds text
  and every parallel call); a `reasoning` item's text becomes the next assistant turn's
  `reasoning_content`.
- Hosted tools (web_search, file_search, ...) are dropped from `tools`: the model just cannot
  call them. History items of a kind we cannot represent are a 400 naming `input[i].type`,
  because dropping them would silently change the conversation.
"""

from __future__ import annotations

from typing import Any

from cortex_core.errors import ApiError, bad_request
from cortex_core.openai.chat import (
    ChatCompletion,
    ChatCompletionAssistantMessage,
    ChatCompletionContentPart,
    ChatCompletionContentPartImage,
    ChatCompletionContentPartText,
    ChatCompletionDeveloperMessage,
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
    ResponseFormatJSONObject,
    ResponseFormatJSONSchema,
    ToolChoiceOption,
)
from cortex_core.openai.responses import (
    FunctionTool,
    IncompleteDetails,
    InputTokensDetails,
    ItemStatus,
    OutputTokensDetails,
    ReasoningText,
    Response,
    ResponseFormatTextJSONSchemaConfig,
    ResponseFunctionToolCall,
    ResponseInputContent,
    ResponseInputFile,
    ResponseInputImage,
    ResponseInputItem,
    ResponseInputText,
    ResponseOutputItem,
    ResponseOutputMessage,
    ResponseOutputRefusal,
    ResponseOutputText,
    ResponseReasoningItem,
    ResponsesRequest,
    ResponseStatus,
    ResponseUsage,
    ToolChoiceFunction,
)
from cortex_core.openai.responses import (
    ResponseFormatJSONObject as TextFormatJSONObject,
)
from cortex_core.wire import UNSET, given

TEXT_SEPARATOR = "\n\n"


def _unsupported(path: str, what: str) -> ApiError:
    return bad_request(f"{path}: {what}", code="unsupported_parameter", param=path)


# --- request ------------------------------------------------------------------------------


def responses_request_to_chat(request: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request that serves a Responses request. Raises ApiError(400)."""
    if given(request.previous_response_id):
        raise _unsupported(
            "previous_response_id",
            "not supported: responses are not stored; send the whole conversation in `input`",
        )
    messages: list[ChatCompletionMessageParam] = []
    if given(request.instructions):
        messages.append(ChatCompletionSystemMessage(content=request.instructions or ""))
    if isinstance(request.input, str):
        messages.append(ChatCompletionUserMessage(content=request.input))
    else:
        messages += _input_items(request.input)

    chat = ChatCompletionRequest(model=request.model, messages=messages)
    chat.max_tokens = request.max_output_tokens
    chat.temperature = request.temperature
    chat.top_p = request.top_p
    chat.top_k = request.top_k
    chat.seed = request.seed
    chat.repetition_penalty = request.repetition_penalty
    chat.parallel_tool_calls = request.parallel_tool_calls
    chat.user = request.user
    if given(request.top_logprobs):
        chat.logprobs = True
        chat.top_logprobs = request.top_logprobs
    if request.stream:
        chat.stream = True
        chat.stream_options = ChatCompletionStreamOptions(include_usage=True)
    tools = chat_tools(request)
    if tools:
        chat.tools = tools
    if given(request.tool_choice) is not None:
        chat.tool_choice = _tool_choice(request)
    if request.reasoning and given(request.reasoning.effort):
        chat.reasoning_effort = request.reasoning.effort
    text_format = given(request.text.format) if request.text else None
    if isinstance(text_format, ResponseFormatTextJSONSchemaConfig):
        chat.response_format = ResponseFormatJSONSchema(
            json_schema=JSONSchema(
                name=text_format.name,
                schema=text_format.schema,
                description=text_format.description,
                strict=text_format.strict,
            )
        )
    elif isinstance(text_format, TextFormatJSONObject):
        chat.response_format = ResponseFormatJSONObject()
    return chat


def _input_items(items: list[ResponseInputItem]) -> list[ChatCompletionMessageParam]:
    messages: list[ChatCompletionMessageParam] = []
    pending_reasoning: list[str] = []
    for i, item in enumerate(items):
        path = f"input[{i}]"
        kind = given(item.type) or "message"
        if kind == "message":
            message = _message_item(item, path)
            if isinstance(message, ChatCompletionAssistantMessage) and pending_reasoning:
                message.reasoning_content = TEXT_SEPARATOR.join(pending_reasoning)
                pending_reasoning = []
            messages.append(message)
        elif kind == "function_call":
            call = ChatCompletionMessageToolCall(
                id=_required(item.call_id, f"{path}.call_id"),
                function=Function(
                    name=_required(item.name, f"{path}.name"), arguments=given(item.arguments) or ""
                ),
            )
            last = messages[-1] if messages else None
            if not isinstance(last, ChatCompletionAssistantMessage) or pending_reasoning:
                last = ChatCompletionAssistantMessage(content="")
                if pending_reasoning:
                    last.reasoning_content = TEXT_SEPARATOR.join(pending_reasoning)
                    pending_reasoning = []
                messages.append(last)
            last.tool_calls = [*(given(last.tool_calls) or []), call]
        elif kind == "function_call_output":
            messages.append(
                ChatCompletionToolMessage(
                    content=_output_text(item, path), tool_call_id=_required(item.call_id, f"{path}.call_id")
                )
            )
        elif kind == "reasoning":
            texts = [part.text for part in given(item.content) or [] if isinstance(part, ReasoningText)]
            if not texts:
                texts = [part.text for part in given(item.summary) or []]
            pending_reasoning += [text for text in texts if text]
        else:
            raise _unsupported(f"{path}.type", f"input items of type `{kind}` are not supported")
    return messages


def _required(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise bad_request(f"{path} is required", param=path)
    return value


def _message_item(item: ResponseInputItem, path: str) -> ChatCompletionMessageParam:
    role = given(item.role)
    if role is None:
        raise bad_request(f"{path}.role is required", param=f"{path}.role")
    content = item.content
    parts: list[ChatCompletionContentPart]
    if isinstance(content, list):
        parts = [_content_part(part, f"{path}.content[{j}]") for j, part in enumerate(content)]
    else:
        parts = [ChatCompletionContentPartText(text=content if isinstance(content, str) else "")]
    has_image = any(isinstance(part, ChatCompletionContentPartImage) for part in parts)
    joined = TEXT_SEPARATOR.join(
        part.text for part in parts if isinstance(part, ChatCompletionContentPartText)
    )
    if has_image and role != "user":
        raise _unsupported(f"{path}.content", f"images are only supported in user messages, not {role}")
    if role == "user":
        return ChatCompletionUserMessage(content=parts if has_image else joined)
    if role == "assistant":
        return ChatCompletionAssistantMessage(content=joined)
    if role == "developer":
        return ChatCompletionDeveloperMessage(content=joined)
    return ChatCompletionSystemMessage(content=joined)


def _content_part(part: ResponseInputContent, path: str) -> ChatCompletionContentPart:
    if isinstance(part, ResponseInputText | ResponseOutputText | ReasoningText):
        return ChatCompletionContentPartText(text=part.text)
    if isinstance(part, ResponseOutputRefusal):
        return ChatCompletionContentPartText(text=part.refusal)
    if isinstance(part, ResponseInputImage):
        url = given(part.image_url)
        if not url:
            raise _unsupported(
                f"{path}.file_id", "file ids are not supported; send `image_url` (a URL or data URL)"
            )
        image_url = ImageURL(url=url)
        if part.detail is not UNSET and part.detail is not None:
            image_url.detail = part.detail
        return ChatCompletionContentPartImage(image_url=image_url)
    assert isinstance(part, ResponseInputFile)
    raise _unsupported(f"{path}.type", "input_file parts are not supported")


def _output_text(item: ResponseInputItem, path: str) -> str:
    output = given(item.output)
    if output is None:
        raise bad_request(f"{path}.output is required", param=f"{path}.output")
    if isinstance(output, str):
        return output
    texts = []
    for j, part in enumerate(output):
        if not isinstance(part, ResponseInputText | ResponseOutputText):
            raise _unsupported(f"{path}.output[{j}]", "only text is supported in a function_call_output")
        texts.append(part.text)
    return TEXT_SEPARATOR.join(texts)


def chat_tools(request: ResponsesRequest) -> list[ChatCompletionFunctionTool]:
    """Function tools of the request in chat form; hosted tools are left out."""
    tools: list[ChatCompletionFunctionTool] = []
    for i, tool in enumerate(given(request.tools) or []):
        if tool.type != "function":
            continue
        wrapped = given(tool.function)
        if wrapped is not None:
            tools.append(
                ChatCompletionFunctionTool(function=_wrapped_function(wrapped, f"tools[{i}].function"))
            )
            continue
        tools.append(
            ChatCompletionFunctionTool(
                function=FunctionDefinition(
                    name=_required(tool.name, f"tools[{i}].name"),
                    description=tool.description,
                    parameters=tool.parameters,
                    strict=tool.strict,
                )
            )
        )
    return tools


def _wrapped_function(function: dict[str, Any], path: str) -> FunctionDefinition:
    definition = FunctionDefinition(name=_required(function.get("name"), f"{path}.name"))
    if isinstance(function.get("description"), str):
        definition.description = function["description"]
    if isinstance(function.get("parameters"), dict):
        definition.parameters = function["parameters"]
    return definition


def _tool_choice(request: ResponsesRequest) -> ToolChoiceOption:
    choice = given(request.tool_choice)
    if isinstance(choice, ToolChoiceFunction):
        if choice.type != "function" or not given(choice.name):
            raise _unsupported("tool_choice", f"tool_choice of type `{choice.type}` is not supported")
        return ChatCompletionNamedToolChoice(function=NamedFunction(name=choice.name or ""))
    if choice == "none" or choice == "auto" or choice == "required":
        return choice
    raise _unsupported("tool_choice", f"tool_choice {choice!r} is not supported")


# --- response -----------------------------------------------------------------------------


def item_ids(response_id: str) -> tuple[str, str, str]:
    """(reasoning, message, function-call prefix) ids derived from the response id."""
    base = response_id.removeprefix("resp_")
    return f"rs_{base}", f"msg_{base}", f"fc_{base}"


def response_shell(
    request: ResponsesRequest, *, response_id: str, created_at: int, status: ResponseStatus = "in_progress"
) -> Response:
    """A Response echoing the request's settings, without output or usage yet."""
    response = Response(id=response_id, created_at=created_at, status=status, model=request.model)
    response.instructions = given(request.instructions)
    response.max_output_tokens = given(request.max_output_tokens)
    response.temperature = given(request.temperature)
    response.top_p = given(request.top_p)
    response.parallel_tool_calls = given(request.parallel_tool_calls) is not False
    response.reasoning = given(request.reasoning)
    response.text = given(request.text)
    response.metadata = given(request.metadata)
    response.user = given(request.user)
    response.tool_choice = given(request.tool_choice) or "auto"
    response.tools = [
        FunctionTool(
            name=tool.function.name,
            description=given(tool.function.description),
            parameters=given(tool.function.parameters),
            strict=given(tool.function.strict),
        )
        for tool in chat_tools(request)
    ]
    return response


def response_usage(usage: CompletionUsage | None) -> ResponseUsage | None:
    if usage is None:
        return None
    prompt_details = given(usage.prompt_tokens_details)
    completion_details = given(usage.completion_tokens_details)
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=InputTokensDetails(
            cached_tokens=(given(prompt_details.cached_tokens) or 0) if prompt_details else 0
        ),
        output_tokens=usage.completion_tokens,
        output_tokens_details=OutputTokensDetails(
            reasoning_tokens=(given(completion_details.reasoning_tokens) or 0) if completion_details else 0
        ),
        total_tokens=usage.total_tokens or usage.prompt_tokens + usage.completion_tokens,
    )


def finish_status(finish_reason: str | None) -> tuple[ResponseStatus, IncompleteDetails | None]:
    if finish_reason == "length":
        return "incomplete", IncompleteDetails(reason="max_output_tokens")
    if finish_reason == "content_filter":
        return "incomplete", IncompleteDetails(reason="content_filter")
    return "completed", None


def response_from_chat_completion(
    completion: ChatCompletion, request: ResponsesRequest, *, response_id: str, created_at: int
) -> Response:
    """The Response for a chat completion's first choice. Ids and time come from the caller."""
    response = response_shell(request, response_id=response_id, created_at=created_at)
    response.usage = response_usage(given(completion.usage))
    choice = completion.choices[0] if completion.choices else None
    response.status, response.incomplete_details = finish_status(choice.finish_reason if choice else None)
    if choice is None:
        return response
    item_status: ItemStatus = "completed" if response.status == "completed" else "incomplete"
    reasoning_id, message_id, call_prefix = item_ids(response_id)
    reply = choice.message
    output: list[ResponseOutputItem] = []
    reasoning = given(reply.reasoning_content) or given(reply.reasoning)
    if reasoning:
        output.append(
            ResponseReasoningItem(
                id=reasoning_id, content=[ReasoningText(text=reasoning)], status="completed"
            )
        )
    tool_calls = given(reply.tool_calls) or []
    if reply.content or not tool_calls:
        output.append(
            ResponseOutputMessage(
                id=message_id, status=item_status, content=[ResponseOutputText(text=reply.content or "")]
            )
        )
    for k, call in enumerate(tool_calls):
        output.append(
            ResponseFunctionToolCall(
                id=f"{call_prefix}_{k}",
                call_id=call.id,
                name=call.function.name,
                arguments=call.function.arguments,
                status="completed",
            )
        )
    response.output = output
    return response
