"""Sampling defaults resolution (request -> generation_config.json -> built-in) and refusals."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from cortex_core.errors import ApiError
from neuron.engine.api import SamplingParams
from neuron.serving.params import SamplingRequest, context_length, eos_token_ids, resolve

QWEN3_PUBLISHED = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "do_sample": True, "eos_token_id": [1, 2]}


def run(request: SamplingRequest, generation_config: dict[str, Any] | None = None, **kw: Any) -> Any:
    args: dict[str, Any] = {"prompt_tokens": 10, "max_context": 100, "eos_ids": frozenset({2})}
    args.update(kw)
    return resolve(request, generation_config=generation_config or {}, **args)


@pytest.mark.parametrize(
    ("request_", "published", "expected"),
    [
        (SamplingRequest(), {}, SamplingParams(temperature=0.7, top_p=1.0, top_k=0, repetition_penalty=1.0)),
        (SamplingRequest(), QWEN3_PUBLISHED, SamplingParams(temperature=0.6, top_p=0.95, top_k=20)),
        (
            SamplingRequest(temperature=0.0, top_k=5),
            QWEN3_PUBLISHED,
            SamplingParams(temperature=0.0, top_p=0.95, top_k=5),
        ),
        (SamplingRequest(), {"do_sample": False, "temperature": 0.9}, SamplingParams(temperature=0.0)),
        (SamplingRequest(temperature=0.5), {"do_sample": False}, SamplingParams(temperature=0.5)),
        (
            SamplingRequest(min_p=0.1, presence_penalty=0.5, frequency_penalty=-0.5, seed=42),
            {"repetition_penalty": 1.05},
            SamplingParams(
                temperature=0.7,
                min_p=0.1,
                presence_penalty=0.5,
                frequency_penalty=-0.5,
                repetition_penalty=1.05,
                seed=42,
            ),
        ),
        (SamplingRequest(top_k=-1), {"top_k": 50}, SamplingParams(temperature=0.7, top_k=0)),
        (SamplingRequest(), {"temperature": "hot"}, SamplingParams(temperature=0.7)),  # malformed: built-in
    ],
)
def test_defaults_resolve_request_then_model_then_builtin(
    request_: SamplingRequest, published: dict[str, Any], expected: SamplingParams
) -> None:
    assert run(request_, published).sampling == expected


@pytest.mark.parametrize(
    ("request_", "prompt_tokens", "max_context", "max_new"),
    [
        (SamplingRequest(), 10, 100, 90),  # default: the rest of the context
        (SamplingRequest(max_tokens=5), 10, 100, 5),
        (SamplingRequest(max_tokens=90), 10, 100, 90),
        (SamplingRequest(), 10, None, 4096),
    ],
)
def test_token_budget(
    request_: SamplingRequest, prompt_tokens: int, max_context: int | None, max_new: int
) -> None:
    assert run(request_, prompt_tokens=prompt_tokens, max_context=max_context).max_new_tokens == max_new


@pytest.mark.parametrize(
    ("request_", "param", "code", "fragment"),
    [
        (SamplingRequest(n=17), "n", "invalid_parameter", "between 1 and 16"),
        (SamplingRequest(n=0), "n", "invalid_parameter", "got 0"),
        (SamplingRequest(logit_bias={"7": -101}), "logit_bias", "invalid_parameter", "[-100, 100]"),
        (SamplingRequest(logit_bias={"+7": 1}), "logit_bias", "invalid_parameter", "token ids"),
        (SamplingRequest(logit_bias={"07": 1}), "logit_bias", "invalid_parameter", "token ids"),
        (SamplingRequest(temperature=-1), "temperature", "invalid_parameter", ">= 0"),
        (SamplingRequest(top_p=0), "top_p", "invalid_parameter", "(0, 1]"),
        (SamplingRequest(top_k=-3), "top_k", "invalid_parameter", "top_k"),
        (SamplingRequest(min_p=2), "min_p", "invalid_parameter", "[0, 1]"),
        (SamplingRequest(presence_penalty=3), "presence_penalty", "invalid_parameter", "[-2, 2]"),
        (SamplingRequest(repetition_penalty=0), "repetition_penalty", "invalid_parameter", "> 0"),
        (SamplingRequest(max_tokens=0), "max_tokens", "invalid_parameter", "at least 1"),
        (SamplingRequest(stop=["x"] * 17), "stop", "invalid_parameter", "16"),
        (SamplingRequest(max_tokens=91), None, "context_length_exceeded", "101"),
    ],
)
def test_invalid_requests_are_400(
    request_: SamplingRequest, param: str | None, code: str, fragment: str
) -> None:
    with pytest.raises(ApiError) as caught:
        run(request_)
    assert caught.value.status == 400
    assert caught.value.code == code
    assert caught.value.param == param
    assert fragment in caught.value.message


def test_prompt_filling_the_context_names_both_numbers() -> None:
    with pytest.raises(ApiError) as caught:
        run(SamplingRequest(), prompt_tokens=120, max_context=100)
    assert "100" in caught.value.message and "120" in caught.value.message
    assert caught.value.extras == {"prompt_len": 120, "max": 100}


def test_an_overflowing_max_tokens_is_carried_as_a_field() -> None:
    with pytest.raises(ApiError) as caught:
        run(SamplingRequest(max_tokens=500), prompt_tokens=10, max_context=100)
    assert caught.value.extras == {"prompt_len": 10, "max_tokens": 500, "max": 100}


@pytest.mark.parametrize(
    ("max_tokens", "prompt_tokens", "max_new", "clamped"),
    [
        (500, 10, 90, True),  # lowered to what the context leaves
        (90, 10, 90, False),  # fits exactly: nothing to say
        (20, 10, 20, False),
        (None, 10, 90, False),  # no max_tokens: the rest of the context, as always
    ],
)
def test_clamp_max_tokens_lowers_instead_of_refusing(
    max_tokens: int | None, prompt_tokens: int, max_new: int, clamped: bool
) -> None:
    resolved = run(SamplingRequest(max_tokens=max_tokens), prompt_tokens=prompt_tokens, clamp_max_tokens=True)
    assert (resolved.max_new_tokens, resolved.clamped) == (max_new, clamped)


def test_clamping_cannot_make_room_for_a_prompt_that_fills_the_context() -> None:
    with pytest.raises(ApiError) as caught:
        run(SamplingRequest(max_tokens=5), prompt_tokens=100, clamp_max_tokens=True)
    assert caught.value.code == "context_length_exceeded"


def test_stop_strings_and_eos() -> None:
    resolved = run(SamplingRequest(stop="END"))
    assert resolved.stop_strings == ("END",)
    assert resolved.stop_token_ids == frozenset({2})
    assert run(SamplingRequest(stop=["a", "", "b"])).stop_strings == ("a", "b")


def test_every_eos_id_is_collected() -> None:
    tokenizer = SimpleNamespace(eos_token_id=7)
    config = SimpleNamespace(eos_token_id=9)
    assert eos_token_ids({"eos_token_id": [128001, 128008, 128009]}, tokenizer, config) == {
        128001,
        128008,
        128009,
        7,
        9,
    }
    assert eos_token_ids({}, SimpleNamespace(eos_token_id=None), SimpleNamespace()) == frozenset()


def test_context_length_from_config() -> None:
    assert context_length(SimpleNamespace(max_position_embeddings=2048)) == 2048
    assert context_length(SimpleNamespace(n_positions=1024)) == 1024
    assert context_length(SimpleNamespace()) is None


def test_logit_bias_becomes_id_pairs_checked_against_the_vocabulary() -> None:
    resolved = run(SamplingRequest(logit_bias={"5": -100, "12": 2.5, "0": 100}), vocab_size=13)
    assert resolved.sampling.logit_bias == ((5, -100.0), (12, 2.5), (0, 100.0))
    with pytest.raises(ApiError) as caught:
        run(SamplingRequest(logit_bias={"13": 1.0}), vocab_size=13)
    assert caught.value.param == "logit_bias"
    assert "0..12" in caught.value.message


def test_n_and_logprobs_pass_through() -> None:
    resolved = run(SamplingRequest(n=3, logprobs=4))
    assert resolved.n == 3
    assert resolved.sampling.logprobs == 4
    assert run(SamplingRequest()).sampling.logprobs is None
