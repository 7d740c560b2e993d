"""Request sampling fields -> the engine's SamplingParams, stop strings and token budget.

Every default resolves request -> the model's generation_config.json -> built-in, so a
model that publishes e.g. `temperature 0.6, top_p 0.95, top_k 20` samples that way unless
the client says otherwise (neuron.md §13.1). The built-in repetition penalty is 1.0 (off),
not the Rust system's 1.1: our engine applies it HF-style over prompt and output, where a
default penalty changes answers that clients expect from the OpenAI semantics. Fields we
do not implement are refused with a 400 rather than silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cortex_core.errors import ApiError
from cortex_core.openai.chat import ChatCompletionRequest
from cortex_core.openai.completions import CompletionRequest
from cortex_core.wire import given
from neuron.engine.api import SamplingParams

BUILTIN_TEMPERATURE = 0.7
# The most choices (`n`) one request may ask for: each is a sequence in the batch.
MAX_CHOICES = 16
# The most top alternatives a token's log-probabilities may list (OpenAI's and vLLM's 20).
MAX_TOP_LOGPROBS = 20
# OpenAI's range for a logit_bias value.
MAX_LOGIT_BIAS = 100.0
# Window sizes transformers configs use for the context length, most specific first.
_CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


@dataclass(frozen=True)
class SamplingRequest:
    """The sampling fields a chat, completions or responses request may carry (None: unset)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    stop: str | Sequence[str] | None = None
    n: int | None = None
    logit_bias: Mapping[str, float] | None = None
    # None: off; k: each token's log-probability and its k most likely alternatives.
    logprobs: int | None = None


def sampling_fields(
    request: ChatCompletionRequest | CompletionRequest, max_tokens: int | None, logprobs: int | None = None
) -> SamplingRequest:
    """The fields chat and legacy completions share; each endpoint decides its max_tokens and
    how many log-probabilities it asks for (the two spell it differently)."""
    return SamplingRequest(
        temperature=given(request.temperature),
        top_p=given(request.top_p),
        top_k=given(request.top_k),
        min_p=given(request.min_p),
        repetition_penalty=given(request.repetition_penalty),
        presence_penalty=given(request.presence_penalty),
        frequency_penalty=given(request.frequency_penalty),
        seed=given(request.seed),
        max_tokens=max_tokens,
        stop=given(request.stop),
        n=given(request.n),
        logit_bias=given(request.logit_bias),
        logprobs=logprobs,
    )


@dataclass(frozen=True)
class ResolvedParams:
    sampling: SamplingParams
    max_new_tokens: int
    stop_strings: tuple[str, ...]
    stop_token_ids: frozenset[int]
    # True when the request's max_tokens was lowered to what the context leaves.
    clamped: bool = False
    n: int = 1


def invalid(message: str, param: str, code: str = "invalid_parameter") -> ApiError:
    return ApiError(400, message, code=code, param=param)


def context_length(hf_config: Any) -> int | None:
    for name in _CONTEXT_ATTRIBUTES:
        value = getattr(hf_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def eos_token_ids(generation_config: Mapping[str, Any], tokenizer: Any, hf_config: Any) -> frozenset[int]:
    """Every EOS id: generation_config.json may list several (Llama 3: <|eot_id|>, <|eom_id|>)."""
    ids: set[int] = set()
    for source in (generation_config.get("eos_token_id"), getattr(hf_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(value for value in source if isinstance(value, int))
    tokenizer_eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(tokenizer_eos, int):
        ids.add(tokenizer_eos)
    return frozenset(ids)


def _pick(request_value: Any, generation_config: Mapping[str, Any], key: str, builtin: Any) -> Any:
    if request_value is not None:
        return request_value
    published = generation_config.get(key)
    return published if isinstance(published, int | float) and not isinstance(published, bool) else builtin


def _stop_strings(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > 16:
        raise invalid(f"at most 16 stop strings are supported, got {len(stops)}", "stop")
    return tuple(s for s in stops if s)


def resolve(
    request: SamplingRequest,
    *,
    prompt_tokens: int,
    generation_config: Mapping[str, Any],
    max_context: int | None,
    eos_ids: frozenset[int],
    clamp_max_tokens: bool = False,
    vocab_size: int | None = None,
) -> ResolvedParams:
    """`clamp_max_tokens`: a max_tokens the context cannot hold is lowered to what it leaves
    instead of refused (the model's `clamp_max_tokens` in models.toml, sent by the gateway);
    `vocab_size`: the tokenizer's, which logit_bias ids must be below."""
    n = 1 if request.n is None else request.n
    if not 1 <= n <= MAX_CHOICES:
        raise invalid(f"n must be between 1 and {MAX_CHOICES}, got {n}", "n")
    do_sample = generation_config.get("do_sample")
    temperature = float(_pick(request.temperature, generation_config, "temperature", BUILTIN_TEMPERATURE))
    if request.temperature is None and do_sample is False:
        temperature = 0.0  # the model publishes greedy decoding
    top_p = float(_pick(request.top_p, generation_config, "top_p", 1.0))
    top_k = int(_pick(request.top_k, generation_config, "top_k", 0))
    min_p = float(_pick(request.min_p, generation_config, "min_p", 0.0))
    repetition = float(_pick(request.repetition_penalty, generation_config, "repetition_penalty", 1.0))
    presence = float(request.presence_penalty or 0.0)
    frequency = float(request.frequency_penalty or 0.0)

    if temperature < 0:
        raise invalid(f"temperature must be >= 0, got {temperature}", "temperature")
    if not 0 < top_p <= 1:
        raise invalid(f"top_p must be in (0, 1], got {top_p}", "top_p")
    if top_k == -1:
        top_k = 0  # vLLM's spelling of "off"
    if top_k < 0:
        raise invalid(f"top_k must be >= 0 (0 or -1: off), got {top_k}", "top_k")
    if not 0 <= min_p <= 1:
        raise invalid(f"min_p must be in [0, 1], got {min_p}", "min_p")
    if repetition <= 0:
        raise invalid(f"repetition_penalty must be > 0, got {repetition}", "repetition_penalty")
    for name, value in (("presence_penalty", presence), ("frequency_penalty", frequency)):
        if not -2 <= value <= 2:
            raise invalid(f"{name} must be in [-2, 2], got {value}", name)

    remaining = None if max_context is None else max_context - prompt_tokens
    if remaining is not None and remaining <= 0:
        raise context_exceeded(max_context or 0, prompt_tokens, request.max_tokens)
    if request.max_tokens is not None:
        if request.max_tokens < 1:
            raise invalid(f"max_tokens must be at least 1, got {request.max_tokens}", "max_tokens")
        clamped = clamp_max_tokens and remaining is not None and request.max_tokens > remaining
        if remaining is not None and request.max_tokens > remaining and not clamped:
            raise context_exceeded(max_context or 0, prompt_tokens, request.max_tokens)
        max_new = remaining if clamped and remaining is not None else request.max_tokens
    else:
        clamped = False
        max_new = remaining if remaining is not None else 4096

    sampling = SamplingParams(
        logit_bias=_logit_bias(request.logit_bias, vocab_size),
        logprobs=request.logprobs,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition,
        presence_penalty=presence,
        frequency_penalty=frequency,
        seed=request.seed,
    )
    return ResolvedParams(sampling, max_new, _stop_strings(request.stop), eos_ids, clamped=bool(clamped), n=n)


def _logit_bias(bias: Mapping[str, float] | None, vocab_size: int | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's `{"token id": bias}` as (id, bias) pairs, each id a plain decimal below the
    vocabulary's size (a bad id would index past the logits on the device) and each bias in
    [-100, 100]."""
    pairs: list[tuple[int, float]] = []
    for key, value in (bias or {}).items():
        token = int(key) if key.isascii() and key.isdigit() else None
        if token is None or str(token) != key:
            raise invalid(f"logit_bias: keys must be token ids (decimal integers), got {key!r}", "logit_bias")
        if vocab_size is not None and token >= vocab_size:
            raise invalid(
                f"logit_bias: token id {token} is outside this model's vocabulary (0..{vocab_size - 1})",
                "logit_bias",
            )
        if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise invalid(
                f"logit_bias: the bias of token {token} must be in [-100, 100], got {value}", "logit_bias"
            )
        pairs.append((token, float(value)))
    return tuple(pairs)


def top_logprobs_count(value: int | None, name: str) -> int | None:
    """A requested number of top alternatives, checked against 0..MAX_TOP_LOGPROBS."""
    if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
        raise invalid(f"{name} must be between 0 and {MAX_TOP_LOGPROBS}, got {value}", name)
    return value


def context_exceeded(max_context: int, prompt_tokens: int, max_tokens: int | None) -> ApiError:
    """vLLM's wording (what OpenAI clients know), with the numbers also as fields: the
    gateway words them for Anthropic clients from `prompt_len`, `max_tokens` and `max`
    (cortex_core.anthropic.errors) rather than parsing this text."""
    asked = f"{prompt_tokens} tokens in the prompt"
    extras: dict[str, int] = {"prompt_len": prompt_tokens, "max": max_context}
    if max_tokens:
        asked += f" plus {max_tokens} requested completion tokens ({prompt_tokens + max_tokens} in total)"
        extras["max_tokens"] = max_tokens
    return ApiError(
        400,
        f"This model's maximum context length is {max_context} tokens. However, you requested "
        f"{asked}. Please reduce the length of the messages or max_tokens.",
        code="context_length_exceeded",
        extras=extras,
    )
