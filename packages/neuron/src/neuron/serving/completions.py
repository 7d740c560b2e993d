"""`POST /v1/completions` (legacy): raw prompt text or token ids, no template, no parsing."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from cortex_core.errors import ApiError
from cortex_core.openai.completions import (
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    prompt_texts_or_ids,
)
from cortex_core.wire import given
from neuron.engine.api import GenerationRequest
from neuron.serving.chat import Prepared, completion_usage, new_completion_id
from neuron.serving.generation import Finished, OutputEvent, OutputProcessor, TextDelta
from neuron.serving.model import ServingModel
from neuron.serving.params import invalid, resolve, sampling_fields


def check_supported(request: CompletionRequest) -> None:
    unsupported = {
        "echo": bool(given(request.echo)),
        "suffix": given(request.suffix) is not None,
        "logprobs": given(request.logprobs) is not None,
        "logit_bias": bool(given(request.logit_bias)),
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
    params = resolve(
        # The legacy API's documented default is 16 tokens.
        sampling_fields(request, given(request.max_tokens) or 16),
        prompt_tokens=len(ids),
        generation_config=model.loaded.generation_config,
        max_context=model.max_context,
        eos_ids=model.eos_ids,
        clamp_max_tokens=clamp,
    )
    processor = OutputProcessor(model.detokenizer(), stop_strings=params.stop_strings)
    generation = GenerationRequest(
        prompt_ids=ids,
        max_new_tokens=params.max_new_tokens,
        sampling=params.sampling,
        stop_token_ids=params.stop_token_ids,
    )
    return Prepared("", generation, processor, clamped=params.clamped)


@dataclass
class CompletionStreamProjector:
    model: str
    include_usage: bool
    id: str = field(default_factory=lambda: new_completion_id("cmpl"))
    created: int = field(default_factory=lambda: int(time.time()))

    def project(self, event: OutputEvent) -> list[CompletionChunk]:
        if isinstance(event, TextDelta):
            choice = CompletionChoice(index=0, text=event.text)
            return [CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])]
        if not isinstance(event, Finished):
            return []  # no reasoning or tool parsing on this endpoint
        final = CompletionChoice(index=0, text="", finish_reason=event.reason)
        if event.stop_sequence is not None:
            final.stop_reason = event.stop_sequence
        chunks = [CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[final])]
        if self.include_usage:
            chunks.append(
                CompletionChunk(
                    id=self.id,
                    created=self.created,
                    model=self.model,
                    choices=[],
                    usage=completion_usage(event.usage),
                )
            )
        return chunks


def collect_completion(model: str, events: Iterable[OutputEvent]) -> Completion:
    text: list[str] = []
    finished: Finished | None = None
    for event in events:
        if isinstance(event, TextDelta):
            text.append(event.text)
        elif isinstance(event, Finished):
            finished = event
    if finished is None:
        raise ApiError(500, "generation ended without a finish event")
    choice = CompletionChoice(index=0, text="".join(text), finish_reason=finished.reason)
    if finished.stop_sequence is not None:
        choice.stop_reason = finished.stop_sequence
    return Completion(
        id=new_completion_id("cmpl"),
        created=int(time.time()),
        model=model,
        choices=[choice],
        usage=completion_usage(finished.usage),
    )
