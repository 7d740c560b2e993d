"""`POST /v1/completions` (legacy): raw prompt text or token ids, no template, no parsing."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from cortex_core.errors import ApiError
from cortex_core.openai.chat import CompletionUsage
from cortex_core.openai.completions import (
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    prompt_texts_or_ids,
)
from cortex_core.wire import given
from neuron.engine.api import GenerationRequest
from neuron.serving.chat import (
    Prepared,
    choice_processors,
    completion_usage,
    new_completion_id,
    request_usage,
    resolve_for,
)
from neuron.serving.generation import (
    ChoiceEvent,
    Finished,
    OutputEvent,
    TextDelta,
    Usage,
    combined_usage,
)
from neuron.serving.logprobs import LogprobsDelta
from neuron.serving.model import ServingModel
from neuron.serving.params import invalid, sampling_fields, top_logprobs_count


def check_supported(request: CompletionRequest) -> None:
    unsupported = {
        "echo": bool(given(request.echo)),
        "suffix": given(request.suffix) is not None,
        "repeat_last_n": given(request.repeat_last_n) is not None,
        "best_of": (given(request.best_of) or 1) != 1,
    }
    for name, present in unsupported.items():
        if present:
            raise invalid(f"{name} is not supported by this server", name, code="unsupported_parameter")


def prompt_ids(model: ServingModel, request: CompletionRequest) -> list[int]:
    prompts = prompt_texts_or_ids(request)
    if len(prompts) != 1:
        raise invalid(
            f"{len(prompts)} prompts in one request are not supported; send one prompt per request",
            "prompt",
        )
    prompt = prompts[0]
    if isinstance(prompt, str):
        return model.encode(prompt, add_special_tokens=True)
    vocab_size = len(model.loaded.tokenizer)
    bad = [token for token in prompt if not 0 <= token < vocab_size]
    if bad:
        raise invalid(f"token ids out of the vocabulary (0..{vocab_size - 1}): {bad[:5]}", "prompt")
    return list(prompt)


def prepare_completion(model: ServingModel, request: CompletionRequest, *, clamp: bool = False) -> Prepared:
    check_supported(request)
    ids = prompt_ids(model, request)
    if not ids:
        raise invalid("the prompt is empty", "prompt")
    fields = sampling_fields(
        request,
        given(request.max_tokens) or 16,  # the legacy API's documented default
        logprobs=top_logprobs_count(given(request.logprobs), "logprobs"),
    )
    params = resolve_for(model, fields, len(ids), clamp=clamp)
    processors = choice_processors(model, params)
    generation = GenerationRequest(
        prompt_ids=ids,
        max_new_tokens=params.max_new_tokens,
        sampling=params.sampling,
        stop_token_ids=params.stop_token_ids,
    )
    return Prepared("", generation, processors, clamped=params.clamped)


@dataclass
class _LogprobsRun:
    """A choice's log-probabilities in the legacy shape, and where its next token starts."""

    offset: int = 0

    def shape(self, deltas: Sequence[LogprobsDelta]) -> CompletionLogprobs:
        """`text_offset` counts characters of the tokens' own texts, as they are listed."""
        offsets = []
        for delta in deltas:
            offsets.append(self.offset)
            self.offset += len(delta.chosen.token.token)
        return CompletionLogprobs(
            tokens=[delta.chosen.token.token for delta in deltas],
            token_logprobs=[delta.chosen.logprob for delta in deltas],
            # The sampled token is always among them, as OpenAI documents (up to logprobs + 1).
            top_logprobs=[
                {entry.token.token: entry.logprob for entry in (*delta.top, delta.chosen)} for delta in deltas
            ],
            text_offset=offsets,
        )


@dataclass
class CompletionStreamProjector:
    model: str
    include_usage: bool
    choices: int = 1
    id: str = field(default_factory=lambda: new_completion_id("cmpl"))
    created: int = field(default_factory=lambda: int(time.time()))
    _logprobs: dict[int, list[LogprobsDelta]] = field(default_factory=dict)
    _runs: dict[int, _LogprobsRun] = field(default_factory=dict)
    _usages: dict[int, Usage] = field(default_factory=dict)

    def _chunk(self, choice: CompletionChoice) -> CompletionChunk:
        pending = self._logprobs.pop(choice.index, None)
        if pending:
            choice.logprobs = self._runs.setdefault(choice.index, _LogprobsRun()).shape(pending)
        return CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])

    def project(self, event: OutputEvent, index: int = 0) -> list[CompletionChunk]:
        if isinstance(event, LogprobsDelta):
            self._logprobs.setdefault(index, []).append(event)
            return []
        if isinstance(event, TextDelta):
            return [self._chunk(CompletionChoice(index=index, text=event.text))]
        if not isinstance(event, Finished):
            return []  # no reasoning or tool parsing on this endpoint
        final = CompletionChoice(index=index, text="", finish_reason=event.reason)
        if event.stop_sequence is not None:
            final.stop_reason = event.stop_sequence
        chunks = [self._chunk(final)]
        self._usages[index] = event.usage
        usage = request_usage(self._usages, self.choices) if self.include_usage else None
        if usage is not None:
            chunks.append(self._usage_chunk(usage))
        return chunks

    def _usage_chunk(self, usage: CompletionUsage) -> CompletionChunk:
        return CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)


def collect_completion(model: str, events: Iterable[ChoiceEvent], *, logprobs: bool = False) -> Completion:
    texts: dict[int, list[str]] = {}
    deltas: dict[int, list[LogprobsDelta]] = {}
    finished: dict[int, Finished] = {}
    for index, event in events:
        if isinstance(event, TextDelta):
            texts.setdefault(index, []).append(event.text)
        elif isinstance(event, LogprobsDelta):
            deltas.setdefault(index, []).append(event)
        elif isinstance(event, Finished):
            finished[index] = event
    if not finished:
        raise ApiError(500, "generation ended without a finish event")
    choices = []
    for index in sorted(finished):
        choice = CompletionChoice(
            index=index, text="".join(texts.get(index, [])), finish_reason=finished[index].reason
        )
        if logprobs:
            choice.logprobs = _LogprobsRun().shape(deltas.get(index, []))
        if finished[index].stop_sequence is not None:
            choice.stop_reason = finished[index].stop_sequence
        choices.append(choice)
    return Completion(
        id=new_completion_id("cmpl"),
        created=int(time.time()),
        model=model,
        choices=choices,
        usage=completion_usage(combined_usage([finished[i].usage for i in sorted(finished)])),
    )
