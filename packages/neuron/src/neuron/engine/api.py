"""What the serving layer asks of the engine, and what comes back.

The serving layer (templates, detokenisation, stop strings, reasoning and tool parsing,
OpenAI projections) works in text; the engine works in token ids. A request is a prompt of
ids plus resolved sampling parameters; the answer is an async stream of `TokenEvent`s.
Closing that stream (e.g. the client disconnected, or a stop string matched) cancels the
sequence and frees its batch slot at the next step.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from cortex_core.neuron_api import ModelLoad
from neuron.engine.constraint import GrammarConstraint

if TYPE_CHECKING:
    from neuron.vision.inputs import ImageInput

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """Fully resolved (request -> generation_config.json -> built-in) before reaching the engine."""

    temperature: float = 1.0  # <= 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    # (token id, bias) pairs added to the raw logits before the penalties, as OpenAI's
    # `logit_bias` (validated against the vocabulary before reaching the engine).
    logit_bias: tuple[tuple[int, float], ...] = ()
    # None: no log-probabilities; k >= 0: each generated token's log-probability and the k
    # most likely alternatives, from the model's raw logits (before logit_bias, penalties,
    # temperature and any mask: vLLM's default `raw_logprobs`).
    logprobs: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # Every EOS id of the model (generation_config.json may list several) plus request extras.
    stop_token_ids: frozenset[int] = frozenset()
    # Structured output: the grammar the answer must follow (its state moves with the
    # sequence, so a request is generated once).
    constraint: GrammarConstraint | None = None
    # A vision model's images: `prompt_ids` holds their placeholder tokens (vision/inputs.py).
    images: ImageInput | None = None


@dataclass(frozen=True)
class TokenEvent:
    """One step of one sequence.

    `token_id` is a generated token to detokenise, or None on a final event that carries no
    text (a stop token is reported as finish_reason "stop" and never as text, and gets no
    log-probability).
    """

    token_id: int | None
    finish_reason: FinishReason | None
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    # With `SamplingParams.logprobs`: the token's log-probability and the most likely
    # alternatives as (token id, log-probability), most likely first.
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None


class Engine(Protocol):
    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Queue the request; yields events as steps complete. Raises ApiError (e.g. 400
        context overflow, 503 queue full) before the first event when it cannot run."""
        ...

    def generate_choices(self, request: GenerationRequest, n: int) -> Sequence[AsyncIterator[TokenEvent]]:
        """`n` independent sequences from one prompt (OpenAI's `n`), one stream each, the
        prompt prefilled once; choice i > 0 samples with seed + i when a seed is given.
        Raises like `generate`."""
        ...

    def load(self) -> ModelLoad:
        """Live counters for /health and the gateway's least-busy choice."""
        ...

    async def close(self) -> None:
        """Finish or cancel running sequences and stop the scheduler."""
        ...
