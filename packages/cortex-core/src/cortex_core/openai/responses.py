"""OpenAI Responses API wire types (`POST /v1/responses`): request, `Response`, stream events.

Names follow the API reference and the SDK (`openai/types/responses`). The neuron serves this
route on top of its chat path (see `responses_convert` and `responses_stream`); only what a
stateless local server can honour is modelled, and the converter refuses the rest by name.

Input items are one flat struct rather than a tagged union, because the API's "easy" message
form `{"role": ..., "content": ...}` carries no `type`, and msgspec needs the tag to pick a
variant. Content parts and output items are tagged unions.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from cortex_core.openai.chat import ReasoningEffort
from cortex_core.wire import UNSET, Maybe


class _Wire(msgspec.Struct, kw_only=True):
    # Classes with a required field after a defaulted one repeat `kw_only=True`: msgspec
    # inherits it, mypy does not see it inherited.
    pass


# --- content parts (input and output) ---------------------------------------------------------


class ResponseInputText(_Wire, tag_field="type", tag="input_text"):
    text: str


class ResponseInputImage(_Wire, tag_field="type", tag="input_image"):
    detail: Maybe[Literal["auto", "low", "high", "original"]] = UNSET
    image_url: Maybe[str] = UNSET
    file_id: Maybe[str] = UNSET


class ResponseInputFile(_Wire, tag_field="type", tag="input_file"):
    file_id: Maybe[str] = UNSET
    file_data: Maybe[str] = UNSET
    file_url: Maybe[str] = UNSET
    filename: Maybe[str] = UNSET


class ResponseOutputText(_Wire, tag_field="type", tag="output_text"):
    text: str
    annotations: list[dict[str, Any]] = msgspec.field(default_factory=list)
    logprobs: Maybe[list[dict[str, Any]]] = UNSET


class ResponseOutputRefusal(_Wire, tag_field="type", tag="refusal"):
    refusal: str


class ReasoningText(_Wire, tag_field="type", tag="reasoning_text"):
    text: str


class SummaryText(_Wire, tag_field="type", tag="summary_text"):
    text: str


ResponseInputContent = (
    ResponseInputText
    | ResponseInputImage
    | ResponseInputFile
    | ResponseOutputText
    | ResponseOutputRefusal
    | ReasoningText
)


# --- request --------------------------------------------------------------------------------


class ResponseInputItem(_Wire):
    """One item of `input`: a message (typed or "easy"), a function call, its output, reasoning.

    `type` is absent on the easy message form. Which other fields apply depends on `type`
    (the converter checks them and names the missing one).
    """

    type: Maybe[str] = UNSET
    id: Maybe[str] = UNSET
    status: Maybe[str] = UNSET
    # message
    role: Maybe[Literal["user", "assistant", "system", "developer"]] = UNSET
    content: Maybe[str | list[ResponseInputContent]] = UNSET
    phase: Maybe[str] = UNSET
    # function_call / function_call_output
    call_id: Maybe[str] = UNSET
    name: Maybe[str] = UNSET
    arguments: Maybe[str] = UNSET
    output: Maybe[str | list[ResponseInputContent]] = UNSET
    # reasoning
    summary: Maybe[list[SummaryText]] = UNSET
    encrypted_content: Maybe[str] = UNSET


class ResponsesTool(_Wire):
    """A tool offered to the model. Function tools are flat (`name` beside `type`); the
    chat-style wrapped shape (`function: {...}`) is accepted too. Hosted tool types
    (web_search, file_search, ...) decode here and the converter drops them."""

    type: str
    name: Maybe[str] = UNSET
    description: Maybe[str] = UNSET
    parameters: Maybe[dict[str, Any]] = UNSET
    strict: Maybe[bool] = UNSET
    function: Maybe[dict[str, Any]] = UNSET


class ToolChoiceFunction(_Wire):
    type: str
    name: Maybe[str] = UNSET


ResponsesToolChoice = Literal["none", "auto", "required"] | ToolChoiceFunction


class Reasoning(_Wire):
    effort: Maybe[ReasoningEffort] = UNSET
    summary: Maybe[str] = UNSET
    generate_summary: Maybe[str] = UNSET


class ResponseFormatText(_Wire, tag_field="type", tag="text"):
    pass


class ResponseFormatJSONObject(_Wire, tag_field="type", tag="json_object"):
    pass


class ResponseFormatTextJSONSchemaConfig(_Wire, tag_field="type", tag="json_schema"):
    name: str
    schema: dict[str, Any]
    description: Maybe[str] = UNSET
    strict: Maybe[bool] = UNSET


ResponseFormatTextConfig = ResponseFormatText | ResponseFormatJSONObject | ResponseFormatTextJSONSchemaConfig


class ResponseTextConfig(_Wire):
    format: Maybe[ResponseFormatTextConfig] = UNSET
    verbosity: Maybe[str] = UNSET


class ResponsesRequest(_Wire):
    model: str
    input: str | list[ResponseInputItem]
    instructions: Maybe[str] = UNSET
    stream: Maybe[bool] = UNSET
    max_output_tokens: Maybe[int] = UNSET
    temperature: Maybe[float] = UNSET
    top_p: Maybe[float] = UNSET
    top_k: Maybe[int] = UNSET
    seed: Maybe[int] = UNSET
    repetition_penalty: Maybe[float] = UNSET
    tools: Maybe[list[ResponsesTool]] = UNSET
    tool_choice: Maybe[ResponsesToolChoice] = UNSET
    parallel_tool_calls: Maybe[bool] = UNSET
    reasoning: Maybe[Reasoning] = UNSET
    text: Maybe[ResponseTextConfig] = UNSET
    previous_response_id: Maybe[str] = UNSET
    metadata: Maybe[dict[str, str]] = UNSET
    store: Maybe[bool] = UNSET
    user: Maybe[str] = UNSET
    include: Maybe[list[str]] = UNSET
    truncation: Maybe[str] = UNSET
    top_logprobs: Maybe[int] = UNSET
    service_tier: Maybe[str] = UNSET


# --- the Response object --------------------------------------------------------------------

ItemStatus = Literal["in_progress", "completed", "incomplete"]


class ResponseOutputMessage(_Wire, tag_field="type", tag="message"):
    id: str
    role: Literal["assistant"] = "assistant"
    status: ItemStatus = "in_progress"
    content: list[ResponseOutputText | ResponseOutputRefusal] = msgspec.field(default_factory=list)


class ResponseFunctionToolCall(_Wire, tag_field="type", tag="function_call"):
    id: str
    call_id: str
    name: str
    arguments: str = ""
    status: ItemStatus = "in_progress"


class ResponseReasoningItem(_Wire, tag_field="type", tag="reasoning"):
    id: str
    summary: list[SummaryText] = msgspec.field(default_factory=list)
    content: Maybe[list[ReasoningText]] = UNSET
    status: ItemStatus = "in_progress"


ResponseOutputItem = ResponseOutputMessage | ResponseFunctionToolCall | ResponseReasoningItem


class InputTokensDetails(_Wire):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(_Wire):
    reasoning_tokens: int = 0


class ResponseUsage(_Wire):
    input_tokens: int = 0
    input_tokens_details: InputTokensDetails = msgspec.field(default_factory=InputTokensDetails)
    output_tokens: int = 0
    output_tokens_details: OutputTokensDetails = msgspec.field(default_factory=OutputTokensDetails)
    total_tokens: int = 0


class ResponseError(_Wire):
    code: str
    message: str


class IncompleteDetails(_Wire):
    reason: str | None = None


class FunctionTool(_Wire, kw_only=True):
    type: Literal["function"] = "function"
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


ResponseStatus = Literal["completed", "failed", "in_progress", "cancelled", "queued", "incomplete"]


class Response(_Wire, kw_only=True):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus = "in_progress"
    model: str
    output: list[ResponseOutputItem] = msgspec.field(default_factory=list)
    usage: ResponseUsage | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: Reasoning | None = None
    temperature: float | None = None
    top_p: float | None = None
    text: ResponseTextConfig | None = None
    tool_choice: ResponsesToolChoice = "auto"
    tools: list[FunctionTool] = msgspec.field(default_factory=list)
    metadata: dict[str, str] | None = None
    store: bool = False
    truncation: str = "disabled"
    user: str | None = None


# --- stream events (each data object carries `type` and a monotonic `sequence_number`) --------


class _Event(_Wire, tag_field="type"):
    sequence_number: int


class ResponseCreatedEvent(_Event, tag="response.created"):
    response: Response


class ResponseInProgressEvent(_Event, tag="response.in_progress"):
    response: Response


class ResponseCompletedEvent(_Event, tag="response.completed"):
    response: Response


class ResponseIncompleteEvent(_Event, tag="response.incomplete"):
    response: Response


class ResponseFailedEvent(_Event, tag="response.failed"):
    response: Response


class ResponseOutputItemAddedEvent(_Event, tag="response.output_item.added"):
    output_index: int
    item: ResponseOutputItem


class ResponseOutputItemDoneEvent(_Event, tag="response.output_item.done"):
    output_index: int
    item: ResponseOutputItem


ContentPart = ResponseOutputText | ResponseOutputRefusal | ReasoningText


class ResponseContentPartAddedEvent(_Event, tag="response.content_part.added"):
    item_id: str
    output_index: int
    content_index: int
    part: ContentPart


class ResponseContentPartDoneEvent(_Event, tag="response.content_part.done"):
    item_id: str
    output_index: int
    content_index: int
    part: ContentPart


class ResponseTextDeltaEvent(_Event, tag="response.output_text.delta"):
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[dict[str, Any]] = msgspec.field(default_factory=list)


class ResponseTextDoneEvent(_Event, tag="response.output_text.done"):
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[dict[str, Any]] = msgspec.field(default_factory=list)


class ResponseReasoningTextDeltaEvent(_Event, tag="response.reasoning_text.delta"):
    item_id: str
    output_index: int
    content_index: int
    delta: str


class ResponseReasoningTextDoneEvent(_Event, tag="response.reasoning_text.done"):
    item_id: str
    output_index: int
    content_index: int
    text: str


class ResponseFunctionCallArgumentsDeltaEvent(_Event, tag="response.function_call_arguments.delta"):
    item_id: str
    output_index: int
    delta: str


class ResponseFunctionCallArgumentsDoneEvent(_Event, tag="response.function_call_arguments.done"):
    item_id: str
    output_index: int
    arguments: str


class ResponseErrorEvent(_Event, tag="error"):
    message: str
    code: str | None = None
    param: str | None = None


ResponseStreamEvent = (
    ResponseCreatedEvent
    | ResponseInProgressEvent
    | ResponseCompletedEvent
    | ResponseIncompleteEvent
    | ResponseFailedEvent
    | ResponseOutputItemAddedEvent
    | ResponseOutputItemDoneEvent
    | ResponseContentPartAddedEvent
    | ResponseContentPartDoneEvent
    | ResponseTextDeltaEvent
    | ResponseTextDoneEvent
    | ResponseReasoningTextDeltaEvent
    | ResponseReasoningTextDoneEvent
    | ResponseFunctionCallArgumentsDeltaEvent
    | ResponseFunctionCallArgumentsDoneEvent
    | ResponseErrorEvent
)
