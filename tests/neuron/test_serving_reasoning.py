"""Reasoning markers from the vocabulary and the streaming reasoning/content splitter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from neuron.serving.reasoning import (
    ReasoningMarkers,
    ReasoningSplitter,
    find_reasoning_markers,
    prompt_opens_reasoning,
    wrap_reasoning,
)

THINK = ReasoningMarkers("<think>", "</think>")


class Vocab:
    def __init__(self, *tokens: str) -> None:
        self.tokens = {token: index for index, token in enumerate(tokens)}

    def get_vocab(self) -> dict[str, int]:
        return self.tokens


@pytest.mark.parametrize(
    ("vocab", "expected"),
    [
        (Vocab("a", "<think>", "</think>"), THINK),
        (Vocab("[THINK]", "[/THINK]"), ReasoningMarkers("[THINK]", "[/THINK]")),
        (Vocab("<think>"), None),  # half a pair is no pair
        (Vocab("hello", "world"), None),
        (Vocab("[THINK]", "[/THINK]", "<think>", "</think>"), THINK),  # probe order
    ],
)
def test_markers_come_from_the_vocabulary(vocab: Vocab, expected: ReasoningMarkers | None) -> None:
    assert find_reasoning_markers(vocab) == expected


def test_tiny_qwen3_has_think_markers(tiny_qwen3: Path) -> None:
    assert find_reasoning_markers(AutoTokenizer.from_pretrained(tiny_qwen3)) == THINK


@pytest.mark.parametrize(
    ("prompt", "opens"),
    [
        ("<|im_start|>assistant\n<think>\n", True),
        ("<|im_start|>assistant\n<think>\n\n</think>\n\n", False),
        ("<|im_start|>assistant\n", False),
        ("old <think>a</think> turn<|im_start|>assistant\n<think>", True),
    ],
)
def test_prompt_opens_reasoning(prompt: str, opens: bool) -> None:
    assert prompt_opens_reasoning(prompt, THINK) is opens
    assert prompt_opens_reasoning(prompt, None) is False


def split(pieces: list[str], *, in_reasoning: bool = False) -> tuple[str, str, list[tuple[str, str]]]:
    splitter = ReasoningSplitter(THINK, in_reasoning=in_reasoning)
    routed = [item for piece in pieces for item in splitter.push(piece)] + splitter.flush()
    reasoning = "".join(text for channel, text in routed if channel == "reasoning")
    content = "".join(text for channel, text in routed if channel == "content")
    return reasoning, content, routed


SPLIT_CASES = [
    # (pieces, in_reasoning, reasoning, content)
    (["<think>\nLet me think.\n</think>\n\nParis."], False, "Let me think.\n", "Paris."),
    (["<th", "ink>", "\nhm", "m</th", "ink>", "\n\n", "Par", "is"], False, "hmm", "Paris"),
    (["Let me think.", "</think>", "\n\nParis."], True, "Let me think.", "Paris."),
    (["still thinking when the budget ran out"], True, "still thinking when the budget ran out", ""),
    (["no reasoning here, 2 < 3"], False, "", "no reasoning here, 2 < 3"),
    (["a <thi", "s is not a marker"], False, "", "a <this is not a marker"),
    (["ends in a partial <th"], False, "", "ends in a partial <th"),
]


@pytest.mark.parametrize(("pieces", "in_reasoning", "reasoning", "content"), SPLIT_CASES)
def test_split_streaming(pieces: list[str], in_reasoning: bool, reasoning: str, content: str) -> None:
    got_reasoning, got_content, routed = split(pieces, in_reasoning=in_reasoning)
    assert (got_reasoning, got_content) == (reasoning, content)
    for _, text in routed:
        assert "<think>" not in text and "</think>" not in text


@pytest.mark.parametrize(("pieces", "in_reasoning", "reasoning", "content"), SPLIT_CASES)
def test_split_whole_text_equals_streaming(
    pieces: list[str], in_reasoning: bool, reasoning: str, content: str
) -> None:
    got_reasoning, got_content, _ = split(["".join(pieces)], in_reasoning=in_reasoning)
    assert (got_reasoning, got_content) == (reasoning, content)


def test_no_markers_means_everything_is_content() -> None:
    splitter = ReasoningSplitter(None, in_reasoning=True)
    assert splitter.push("<think>x</think>") == [("content", "<think>x</think>")]


def test_wrap_reasoning_rebalances_blocks() -> None:
    pieces: list[Any] = [("reasoning", "hmm"), ("reasoning", "."), ("content", "Paris")]
    texts, inside = wrap_reasoning(pieces, THINK, inside=False)
    assert "".join(texts) == "<think>hmm.</think>Paris" and not inside
    texts, inside = wrap_reasoning([("reasoning", "cut")], THINK, inside=False)
    assert texts == ["<think>", "cut"] and inside
