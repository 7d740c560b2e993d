"""The cheap refusals of cortex_core.limits: JSON nesting, conversation size, echoed names."""

from __future__ import annotations

import json
import random

import msgspec
import pytest

from cortex_core.errors import ApiError
from cortex_core.limits import (
    MAX_JSON_DEPTH,
    PromptLimits,
    check_prompt,
    echoed,
    json_depth_exceeds,
    prompt_check,
    prompt_size,
)


def nested(depth: int, opener: str = "[") -> bytes:
    """`depth` arrays (`[[[1]]]`) or objects (`{"a":{"a":1}}`) inside each other."""
    if opener == "[":
        return ("[" * depth + "1" + "]" * depth).encode()
    return ('{"a":' * depth + "1" + "}" * depth).encode()


@pytest.mark.parametrize("opener", ["[", "{"])
def test_depth_at_the_limit_passes_and_one_more_is_refused(opener: str) -> None:
    assert not json_depth_exceeds(nested(MAX_JSON_DEPTH, opener))
    assert json_depth_exceeds(nested(MAX_JSON_DEPTH + 1, opener))


def test_depth_counts_the_deepest_branch_not_the_total() -> None:
    wide = json.dumps({"messages": [{"role": "user", "content": "x"}] * 10_000}).encode()
    assert not json_depth_exceeds(wide, limit=3)
    assert json_depth_exceeds(wide, limit=2)


def test_brackets_inside_strings_do_not_count() -> None:
    body = json.dumps({"content": "[" * 1000 + '\\"{' * 500}).encode()
    assert not json_depth_exceeds(body, limit=1)


def true_depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((true_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((true_depth(v) for v in value), default=0)
    return 0


def random_value(rng: random.Random, depth: int) -> object:
    kind = rng.random()
    if depth == 0 or kind < 0.3:
        # Strings full of what the scanner must see through: brackets, quotes, backslashes.
        return "".join(rng.choice('[]{}"\\ab,:') for _ in range(rng.randrange(6)))
    if kind < 0.65:
        return [random_value(rng, depth - 1) for _ in range(rng.randrange(4))]
    return {random_value(rng, 0): random_value(rng, depth - 1) for _ in range(rng.randrange(4))}


@pytest.mark.parametrize("seed", range(200))
def test_the_depth_is_exact_whatever_the_strings_hold(seed: int) -> None:
    rng = random.Random(seed)
    value = random_value(rng, rng.randrange(1, 8))
    # Padding with flat brackets gets past the cheap exit (which counts every bracket).
    body = json.dumps([value, [[]] * 10], ensure_ascii=rng.random() < 0.5).encode()
    depth = max(true_depth([value, [[]]]), 2)
    assert not json_depth_exceeds(body, depth)
    assert json_depth_exceeds(body, depth - 1)


def test_the_depth_a_decoder_gives_up_on_is_refused_first() -> None:
    body = nested(1000, "{")
    with pytest.raises(RecursionError):
        msgspec.json.decode(body)
    assert json_depth_exceeds(body)


def chat(messages: int, content: str = "hi", **extra: object) -> bytes:
    return json.dumps(
        {"model": "org/m", "messages": [{"role": "user", "content": content}] * messages, **extra}
    ).encode()


def test_prompt_size_of_each_dialect() -> None:
    size = prompt_size(chat(3))
    assert size is not None and (size.model, size.messages) == ("org/m", 3)
    assert size.prompt_bytes == 3 * len(b'{"role": "user", "content": "hi"}')
    anthropic = prompt_size(json.dumps({"model": "m", "system": "be brief", "messages": []}).encode())
    assert anthropic is not None and anthropic.prompt_bytes == len(b'"be brief"')
    responses = prompt_size(json.dumps({"model": "m", "input": "hello", "instructions": "x"}).encode())
    assert responses is not None and (responses.messages, responses.prompt_bytes) == (0, 5 + 3)
    items = prompt_size(json.dumps({"model": "m", "input": [{"role": "user", "content": "a"}] * 4}).encode())
    assert items is not None and items.messages == 4
    completion = prompt_size(json.dumps({"model": "m", "prompt": "abc"}).encode())
    assert completion is not None and completion.prompt_bytes == 5


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"model": 5}', b'{"messages": "x"}'])
def test_a_body_that_is_not_a_request_is_left_to_the_handler(body: bytes) -> None:
    assert prompt_size(body) is None


def test_too_many_messages_is_a_400_naming_the_limit_and_where_it_is_set() -> None:
    limits = PromptLimits(max_messages=2, max_prompt_bytes=10_000, setting="{key} in neuron.toml")
    check_prompt(prompt_size(chat(2)) or pytest.fail(), limits)
    with pytest.raises(ApiError) as refused:
        check_prompt(prompt_size(chat(3)) or pytest.fail(), limits)
    assert refused.value.status == 400
    assert refused.value.code == "too_many_messages"
    assert "at most 2 (max_messages in neuron.toml)" in refused.value.message


def test_too_many_prompt_bytes_is_a_400_naming_the_limit() -> None:
    check = prompt_check(lambda model: PromptLimits(100, 50, f"gateway.{{key}} for {model}"))
    check(chat(1))
    with pytest.raises(ApiError) as refused:
        check(chat(1, content="x" * 100))
    assert refused.value.code == "prompt_too_large"
    assert "at most 50 (gateway.max_prompt_bytes for org/m)" in refused.value.message


def test_echoed_names_are_cut_and_say_so() -> None:
    assert echoed("org/m") == "org/m"
    cut = echoed("x" * 100_000)
    assert len(cut) < 200
    assert cut.endswith("(99880 more characters)")
