"""Incremental detokenisation and stop strings."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from neuron.serving.detok import REPLACEMENT_CHAR, IncrementalDetokenizer, marker_token_ids
from neuron.serving.stops import StopStringMatcher


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen3: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_qwen3)


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    deltas = [detok.push(token) for token in ids]
    return [*deltas, detok.flush()]


@pytest.mark.parametrize(
    "text", ["Zürich et São Paulo", "東京 と 北京 🙂🙂", "plain ascii, numbers 12345", "é🙂x"]
)
def test_multibyte_text_round_trips_without_broken_characters(tokenizer: Any, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    # The tiny vocabulary spells rare characters as several byte tokens.
    assert len(ids) > len(text.split())
    deltas = stream(IncrementalDetokenizer(tokenizer), ids)
    assert "".join(deltas) == text
    assert not any(REPLACEMENT_CHAR in delta for delta in deltas)


def test_a_split_character_is_held_until_complete(tokenizer: Any) -> None:
    ids = tokenizer.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1, "the emoji must be split over byte tokens for this test to mean anything"
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(token) for token in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1)
    assert deltas[-1] == "🙂"


def test_random_token_streams_match_a_full_decode(tokenizer: Any) -> None:
    """Random weights produce arbitrary byte fragments; the stream must still add up."""
    rng = random.Random(7)
    vocab = len(tokenizer)
    special = set(tokenizer.all_special_ids)
    for _ in range(50):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        deltas = stream(IncrementalDetokenizer(tokenizer), ids)
        expected = tokenizer.decode([i for i in ids if i not in special])
        assert "".join(deltas) == expected
        # Only a genuinely invalid byte sequence may show up as U+FFFD, never a held-back half.
        assert "".join(deltas).count(REPLACEMENT_CHAR) == expected.count(REPLACEMENT_CHAR)


def test_special_tokens_dropped_except_kept_markers(tokenizer: Any) -> None:
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    think = tokenizer.convert_tokens_to_ids("<think>")
    hello = tokenizer.encode("Hello", add_special_tokens=False)
    keep = marker_token_ids(tokenizer, ["<think>", "</think>", "[NOT-IN-VOCAB]"])
    assert keep == {think, tokenizer.convert_tokens_to_ids("</think>")}
    deltas = stream(IncrementalDetokenizer(tokenizer, keep=keep), [think, *hello, im_end])
    assert "".join(deltas) == "<think>Hello"


STOP_CASES = [
    # (stops, pieces, emitted text, the stop string that matched)
    (["</answer>"], ["The answer", " is 4", "</ans", "wer> trailing"], "The answer is 4", "</answer>"),
    (["</answer>"], ["a<", "/", "an", "swer", ">b"], "a", "</answer>"),
    (["STOP"], ["ST", "ART and go"], "START and go", None),
    (["\n\n"], ["line one\n", "\nline two"], "line one", "\n\n"),
    (["abc", "bcd"], ["xab", "cd"], "x", "abc"),
    (["abc", "b"], ["xa", "bc"], "x", "abc"),  # the earliest match wins
    (["bc", "xab"], ["xa", "bc"], "", "xab"),
    ([], ["no stops at all"], "no stops at all", None),
    (["never"], ["held partial: nev"], "held partial: nev", None),
    ([""], ["empty stop strings are ignored"], "empty stop strings are ignored", None),
]


@pytest.mark.parametrize(("stops", "pieces", "emitted", "matched"), STOP_CASES)
def test_stop_strings_split_across_tokens(
    stops: list[str], pieces: list[str], emitted: str, matched: str | None
) -> None:
    matcher = StopStringMatcher(stops)
    out = []
    for piece in pieces:
        out.append(matcher.push(piece))
        for stop in stops:
            if stop:
                assert stop not in "".join(out)
    out.append(matcher.flush())
    assert "".join(out) == emitted
    assert matcher.stopped is (matched is not None)
    assert matcher.matched == matched


def test_partial_match_is_held_not_emitted() -> None:
    matcher = StopStringMatcher(["</answer>"])
    assert matcher.push("4</ans") == "4"
    assert matcher.push("x") == "</ansx"
