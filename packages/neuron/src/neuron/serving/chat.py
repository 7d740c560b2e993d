"""`POST /v1/chat/completions`: request -> prompt and generation; events -> chat wire objects.

Everything here is pure: `prepare_chat` turns a decoded request into a `Prepared`
generation (prompt ids, resolved parameters, an output processor), and the projections
turn output events into `ChatCompletionChunk`s or one `ChatCompletion`. The HTTP edge
(routes.py) does the I/O.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import msgspec

from cortex_core.errors import ApiError
from cortex_core.http import MAX_TOKENS_CLAMPED_HEADER
from cortex_core.openai.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionMessageToolCall,
    ChatCompletionRequest,
    ChatCompletionTokenLogprob,
    Choice,
    ChoiceDelta,
    ChoiceDeltaToolCall,
    ChoiceDeltaToolCallFunction,
    ChoiceLogprobs,
    ChunkChoice,
    CompletionTokensDetails,
    CompletionUsage,
    Function,
    PromptTokensDetails,
    TopLogprob,
)
from cortex_core.wire import UNSET, given
from neuron.engine.api import GenerationRequest
from neuron.engine.constraint import GrammarConstraint, ReasoningGate
from neuron.serving.generation import (
    ChoiceEvent,
    Finished,
    OutputEvent,
    OutputProcessor,
    ReasoningDelta,
    TextDelta,
    Usage,
    combined_usage,
)
from neuron.serving.logprobs import LogprobsDelta, TokenLogprob
from neuron.serving.model import ServingModel
from neuron.serving.params import (
    ResolvedParams,
    SamplingRequest,
    invalid,
    resolve,
    sampling_fields,
    top_logprobs_count,
)
from neuron.serving.reasoning import ReasoningMarkers, prompt_opens_reasoning
from neuron.serving.structured import request_grammar
from neuron.serving.template import template_messages, with_tool_instructions
from neuron.serving.tools import ToolCallArguments, ToolCallParser, ToolCallStart, tool_instructions
from neuron.vision.refs import image_refs

if TYPE_CHECKING:
    from neuron.vision.inputs import ImageInput

# Refusals name chat fields as they are, unless a dialect served on the chat path renames them.
CHAT_FIELDS: Mapping[str, str] = MappingProxyType({})

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A request ready for the engine; `prompt` is kept for count_tokens and debugging."""

    prompt: str
    generation: GenerationRequest
    # One per choice (OpenAI's `n`).
    processors: list[OutputProcessor]
    # The request's max_tokens was lowered to `generation.max_new_tokens` (clamp_max_tokens).
    clamped: bool = False

    @property
    def logprobs(self) -> bool:
        return self.generation.sampling.logprobs is not None

    def usage_now(self) -> Usage | None:
        """The usage so far, every choice's completion included (None before the prefill)."""
        usages = [p.usage for p in self.processors if p.usage is not None]
        return combined_usage(usages) if usages else None

    def response_headers(self) -> dict[str, str]:
        """Says so when max_tokens was lowered, with the value used (docs/gateway.md)."""
        if not self.clamped:
            return {}
        return {MAX_TOKENS_CLAMPED_HEADER: str(self.generation.max_new_tokens)}


def enable_thinking_default(request: ChatCompletionRequest, fallback: bool | None) -> bool | None:
    """`reasoning_effort` says whether the client wants thinking ("none": no); else `fallback`."""
    effort = given(request.reasoning_effort)
    if effort is not None:
        return effort != "none"
    return fallback


def require_messages(request: ChatCompletionRequest, field_names: Mapping[str, str] = CHAT_FIELDS) -> None:
    """A 400 for an empty conversation: the template would render only the generation
    prompt, and the model would answer nothing in particular."""
    if not request.messages:
        name = field_names.get("messages", "messages")
        raise invalid(f"{name}: at least one message is required", name)


def check_supported(request: ChatCompletionRequest, field_names: Mapping[str, str] = CHAT_FIELDS) -> None:
    """Refuse what the engine cannot do; `field_names` names the fields as the caller's
    dialect did (a Responses client sent `text.format`, not `response_format`)."""
    require_messages(request, field_names)
    if given(request.repeat_last_n) is not None:
        raise invalid(
            "repeat_last_n is not supported: the repetition penalty covers the whole sequence",
            "repeat_last_n",
            code="unsupported_parameter",
        )


def chat_logprobs(request: ChatCompletionRequest) -> int | None:
    """How many top alternatives each token's log-probability comes with (None: none asked)."""
    top = top_logprobs_count(given(request.top_logprobs), "top_logprobs")
    if not given(request.logprobs):
        if top:
            raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
        return None
    return top or 0


def sampling_request(request: ChatCompletionRequest) -> SamplingRequest:
    max_tokens = given(request.max_completion_tokens)
    return sampling_fields(
        request,
        max_tokens if max_tokens is not None else given(request.max_tokens),
        logprobs=chat_logprobs(request),
    )


def continues_final_message(
    request: ChatCompletionRequest, field_names: Mapping[str, str] = CHAT_FIELDS
) -> bool:
    """vLLM's `continue_final_message` (with `add_generation_prompt` false, its default
    then): the final message must be the assistant's, which the answer continues."""
    if not given(request.continue_final_message):
        return False
    if given(request.add_generation_prompt):
        raise invalid(
            "continue_final_message and add_generation_prompt cannot both be true", "add_generation_prompt"
        )
    if not request.messages or request.messages[-1].__struct_config__.tag != "assistant":
        name = field_names.get("messages", "messages")
        raise invalid(
            f"continue_final_message needs the final message of {name} to be the assistant's",
            "continue_final_message",
        )
    return True


def template_kwargs(
    model: ServingModel, request: ChatCompletionRequest, *, enable_thinking: bool | None
) -> dict[str, Any]:
    """`enable_thinking` is the template default when the client's chat_template_kwargs do
    not set it (None: leave it to the template)."""
    kwargs: dict[str, Any] = dict(given(request.chat_template_kwargs) or {})
    if model.markers is not None and enable_thinking is not None:
        kwargs.setdefault("enable_thinking", enable_thinking)
    return kwargs


def render_chat_prompt(
    model: ServingModel,
    request: ChatCompletionRequest,
    *,
    enable_thinking: bool | None,
    field_names: Mapping[str, str] = CHAT_FIELDS,
) -> str:
    messages = template_messages(
        msgspec.to_builtins(request.messages), model.model_id, images=model.images is not None
    )
    tools = msgspec.to_builtins(given(request.tools)) or None
    kwargs = template_kwargs(model, request, enable_thinking=enable_thinking)
    continuation = continues_final_message(request, field_names)
    add_generation_prompt = given(request.add_generation_prompt)

    def render(messages: list[dict[str, Any]], tools: list[Any] | None) -> str:
        if continuation:
            return model.template.render_continuation(messages, tools=tools, template_kwargs=kwargs)
        return model.template.render(
            messages,
            tools=tools,
            add_generation_prompt=True if add_generation_prompt is None else add_generation_prompt,
            template_kwargs=kwargs,
        )

    if not tools or model.template.takes_tools:
        return render(messages, tools)
    # The template has no place for tools: the system message gets them, as far as they fit.
    without = with_tool_instructions(messages, None, model.tool_format.write_call)
    room = model.room_for_tools(render(without, None))
    instructions = tool_instructions(
        tools, model.tool_format, lambda text: room is None or model.count_tokens(text) <= room
    )
    if instructions is None:
        log.info(
            "%s: %d tools left out of the prompt: even listed briefly they would take it past "
            "half of the %s-token context window",
            model.model_id,
            len(tools),
            model.max_context,
        )
        return render(without, None)
    return render(with_tool_instructions(messages, instructions, model.tool_format.write_call), None)


def reasoning_gate(model: ServingModel, prompt: str, *, thinking_off: bool) -> ReasoningGate | None:
    """Where a structured answer starts: after the model's reasoning, if it reasons."""
    markers = model.markers
    if markers is None:
        return None
    opened = prompt_opens_reasoning(prompt, markers)
    if thinking_off and not opened:
        return None
    ids = model.traits.marker_ids
    return ReasoningGate(ids[markers.open], ids[markers.close], open_in_prompt=opened)


def structured_constraint(
    model: ServingModel,
    request: ChatCompletionRequest,
    prompt: str,
    *,
    enable_thinking: bool | None,
    field_names: Mapping[str, str],
) -> GrammarConstraint | None:
    """The grammar of a structured request (response_format, forced tool_choice); None if free."""
    tools = msgspec.to_builtins(given(request.tools)) or []
    structured = request_grammar(request, tools, model.tool_format, model.traits.marker_ids, field_names)
    if structured is None:
        return None
    grammar, field_name = structured
    thinking_off = (
        template_kwargs(model, request, enable_thinking=enable_thinking).get("enable_thinking") is False
    )
    gate = reasoning_gate(model, prompt, thinking_off=thinking_off)
    return model.traits.grammars.constraint(grammar, field_names.get(field_name, field_name), gate)


def chat_prompt_ids(
    model: ServingModel,
    request: ChatCompletionRequest,
    *,
    enable_thinking: bool | None,
    field_names: Mapping[str, str] = CHAT_FIELDS,
) -> tuple[str, list[int], ImageInput | None]:
    """The rendered prompt, its token ids (a vision model's images expanded to one token per
    merged patch, so usage and count_tokens count them) and the images for the engine."""
    prompt = render_chat_prompt(model, request, enable_thinking=enable_thinking, field_names=field_names)
    # The template already wrote BOS and other specials, as transformers assumes.
    prompt_ids = model.encode(prompt, add_special_tokens=False)
    refs = image_refs(msgspec.to_builtins(request.messages))
    if not refs or model.images is None:  # without a preparer, template_messages refused them
        return prompt, prompt_ids, None
    prompt_ids, images = model.images.prepare(prompt_ids, refs, model.model_id)
    return prompt, prompt_ids, images


def prepare_chat(
    model: ServingModel,
    request: ChatCompletionRequest,
    *,
    thinking: bool,
    enable_thinking: bool | None,
    field_names: Mapping[str, str] = CHAT_FIELDS,
    clamp: bool = False,
) -> Prepared:
    """`thinking`: reasoning goes back into content inside its markers (x-include-thinking);
    `field_names`: see `check_supported`."""
    check_supported(request, field_names)
    prompt, prompt_ids, images = chat_prompt_ids(
        model, request, enable_thinking=enable_thinking, field_names=field_names
    )
    params = resolve_for(model, sampling_request(request), len(prompt_ids), clamp=clamp)
    tools = msgspec.to_builtins(given(request.tools)) or []
    parse_tools = bool(tools) and given(request.tool_choice) != "none"
    processors = choice_processors(
        model,
        params,
        markers=model.markers,
        starts_in_reasoning=prompt_opens_reasoning(prompt, model.markers),
        include_thinking=thinking,
        tool_parser=partial(model.tool_format.parser, tools) if parse_tools else None,
    )
    generation = GenerationRequest(
        prompt_ids=prompt_ids,
        max_new_tokens=params.max_new_tokens,
        sampling=params.sampling,
        stop_token_ids=params.stop_token_ids,
        constraint=structured_constraint(
            model, request, prompt, enable_thinking=enable_thinking, field_names=field_names
        ),
        images=images,
    )
    return Prepared(prompt, generation, processors, clamped=params.clamped)


def resolve_for(
    model: ServingModel, fields: SamplingRequest, prompt_tokens: int, *, clamp: bool
) -> ResolvedParams:
    """A request's sampling fields against this model: its generation_config's defaults, its
    context, end-of-sequence ids and vocabulary (`clamp`: see `resolve`)."""
    return resolve(
        fields,
        prompt_tokens=prompt_tokens,
        generation_config=model.loaded.generation_config,
        max_context=model.max_context,
        eos_ids=model.eos_ids,
        clamp_max_tokens=clamp,
        vocab_size=model.vocab_size,
    )


def choice_processors(
    model: ServingModel,
    params: ResolvedParams,
    *,
    markers: ReasoningMarkers | None = None,
    starts_in_reasoning: bool = False,
    include_thinking: bool = False,
    tool_parser: Callable[[], ToolCallParser] | None = None,
) -> list[OutputProcessor]:
    """One output processor per choice (OpenAI's `n`), each with its own detokenizer and tool
    parser (both keep state); with token texts when the request asked for log-probabilities."""
    logprobs = params.sampling.logprobs is not None
    return [
        OutputProcessor(
            model.detokenizer(),
            stop_strings=params.stop_strings,
            markers=markers,
            starts_in_reasoning=starts_in_reasoning,
            include_thinking=include_thinking,
            tool_parser=tool_parser() if tool_parser is not None else None,
            token_texts=model.token_texts() if logprobs else None,
        )
        for _ in range(params.n)
    ]


def completion_usage(usage: Usage) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=usage.reasoning_tokens),
    )


def request_usage(finished: Mapping[int, Usage], choices: int) -> CompletionUsage | None:
    """What a stream's usage chunk carries: the request's usage, every choice counted, once
    all `choices` have finished (`finished`: each one's usage by index); None until then."""
    if len(finished) != choices:
        return None
    return completion_usage(combined_usage([finished[i] for i in sorted(finished)]))


def new_completion_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def token_logprob(entry: TokenLogprob) -> TopLogprob:
    return TopLogprob(token=entry.token.token, logprob=entry.logprob, bytes=list(entry.token.bytes))


def chat_logprobs_of(deltas: Iterable[LogprobsDelta]) -> ChoiceLogprobs:
    """OpenAI's `choices[].logprobs`: one entry per token with its top alternatives."""
    return ChoiceLogprobs(
        content=[
            ChatCompletionTokenLogprob(
                token=delta.chosen.token.token,
                logprob=delta.chosen.logprob,
                bytes=list(delta.chosen.token.bytes),
                top_logprobs=[token_logprob(alternative) for alternative in delta.top],
            )
            for delta in deltas
        ]
    )


@dataclass
class ChatStreamProjector:
    """Output events of every choice -> chat.completion.chunk objects for one streamed answer."""

    model: str
    include_usage: bool
    # With `stream_options.continuous_usage_stats`: the usage so far, put on every chunk.
    usage_now: Callable[[], Usage | None] | None = None
    choices: int = 1
    id: str = field(default_factory=new_completion_id)
    created: int = field(default_factory=lambda: int(time.time()))
    # Log-probabilities of each choice's tokens not yet sent: they go with its next chunk.
    _logprobs: dict[int, list[LogprobsDelta]] = field(default_factory=dict)
    _usages: dict[int, Usage] = field(default_factory=dict)

    def _chunk(
        self,
        index: int,
        delta: ChoiceDelta,
        finish_reason: str | None = None,
        stop_reason: str | None = None,
    ) -> ChatCompletionChunk:
        choice = ChunkChoice(index=index, delta=delta, finish_reason=finish_reason)
        if stop_reason is not None:
            choice.stop_reason = stop_reason
        pending = self._logprobs.pop(index, None)
        if pending:
            choice.logprobs = chat_logprobs_of(pending)
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])
        usage = self.usage_now() if self.usage_now is not None else None
        if usage is not None:
            chunk.usage = completion_usage(usage)
        return chunk

    def start(self) -> list[ChatCompletionChunk]:
        return [
            self._chunk(index, ChoiceDelta(role="assistant", content="")) for index in range(self.choices)
        ]

    def project(self, event: OutputEvent, index: int = 0) -> list[ChatCompletionChunk]:
        if isinstance(event, LogprobsDelta):
            self._logprobs.setdefault(index, []).append(event)
            return []
        if isinstance(event, TextDelta):
            return [self._chunk(index, ChoiceDelta(content=event.text))]
        if isinstance(event, ReasoningDelta):
            return [self._chunk(index, ChoiceDelta(reasoning_content=event.text, reasoning=event.text))]
        if isinstance(event, ToolCallStart):
            call = ChoiceDeltaToolCall(
                index=event.index,
                id=event.id,
                type="function",
                function=ChoiceDeltaToolCallFunction(name=event.name, arguments=""),
            )
            return [self._chunk(index, ChoiceDelta(tool_calls=[call]))]
        if isinstance(event, ToolCallArguments):
            call = ChoiceDeltaToolCall(
                index=event.index, function=ChoiceDeltaToolCallFunction(arguments=event.delta)
            )
            return [self._chunk(index, ChoiceDelta(tool_calls=[call]))]
        chunks = [
            self._chunk(index, ChoiceDelta(), finish_reason=event.reason, stop_reason=event.stop_sequence)
        ]
        self._usages[index] = event.usage
        usage = request_usage(self._usages, self.choices) if self.include_usage else None
        if usage is not None:
            chunks.append(self._usage_chunk(usage))
        return chunks

    def _usage_chunk(self, usage: CompletionUsage) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage
        )


def collect_chat_completion(
    model: str, events: Iterable[ChoiceEvent], *, logprobs: bool = False
) -> ChatCompletion:
    """The whole answer from every choice's events (`logprobs`: the request asked for them)."""
    by_choice: dict[int, list[OutputEvent]] = {}
    for index, event in events:
        by_choice.setdefault(index, []).append(event)
    choices: list[Choice] = []
    usages: list[Usage] = []
    for index in sorted(by_choice):
        choice, usage = _collect_choice(index, by_choice[index], logprobs=logprobs)
        choices.append(choice)
        usages.append(usage)
    if not choices:
        raise ApiError(500, "generation ended without a finish event")
    return ChatCompletion(
        id=new_completion_id(),
        created=int(time.time()),
        model=model,
        choices=choices,
        usage=completion_usage(combined_usage(usages)),
    )


def _collect_choice(index: int, events: Iterable[OutputEvent], *, logprobs: bool) -> tuple[Choice, Usage]:
    content: list[str] = []
    reasoning: list[str] = []
    calls: dict[int, tuple[str, str, list[str]]] = {}
    token_logprobs: list[LogprobsDelta] = []
    finished: Finished | None = None
    for event in events:
        if isinstance(event, TextDelta):
            content.append(event.text)
        elif isinstance(event, ReasoningDelta):
            reasoning.append(event.text)
        elif isinstance(event, ToolCallStart):
            calls[event.index] = (event.id, event.name, [])
        elif isinstance(event, ToolCallArguments):
            calls[event.index][2].append(event.delta)
        elif isinstance(event, LogprobsDelta):
            token_logprobs.append(event)
        else:
            finished = event
    if finished is None:
        raise ApiError(500, "generation ended without a finish event")
    tool_calls = [
        ChatCompletionMessageToolCall(id=call_id, function=Function(name=name, arguments="".join(args)))
        for call_id, name, args in (calls[i] for i in sorted(calls))
    ]
    text = "".join(content)
    thoughts = "".join(reasoning)
    message = ChatCompletionMessage(
        content=text if text or not tool_calls else None,
        reasoning_content=thoughts if thoughts else UNSET,
        reasoning=thoughts if thoughts else UNSET,
        tool_calls=tool_calls if tool_calls else UNSET,
    )
    choice = Choice(index=index, message=message, finish_reason=finished.reason)
    if logprobs:
        choice.logprobs = chat_logprobs_of(token_logprobs)
    if finished.stop_sequence is not None:
        choice.stop_reason = finished.stop_sequence
    return choice, finished.usage
