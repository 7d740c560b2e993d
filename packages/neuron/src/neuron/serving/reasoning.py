"""Reasoning ("thinking") text: which markers a model uses, and splitting output by them.

Markers are looked up in the tokenizer's vocabulary — a pair counts only when both are
single tokens — never guessed from the model's name. The splitter works on text (after
detokenisation, which keeps marker tokens), routes everything between an open and a close
marker to reasoning, and never lets a marker or reasoning text leak into content. A
template that opens `<think>` inside the prompt (Qwen3.6 does) makes generation start in
reasoning; `prompt_opens_reasoning` detects that from the rendered prompt.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

# Probed in this order; the first pair whose both halves are single tokens wins.
KNOWN_MARKERS: tuple[tuple[str, str], ...] = (
    ("<think>", "</think>"),
    ("[THINK]", "[/THINK]"),
    ("<thought>", "</thought>"),
    ("<reasoning>", "</reasoning>"),
)

Channel = Literal["reasoning", "content"]


@dataclass(frozen=True)
class ReasoningMarkers:
    open: str
    close: str


def find_reasoning_markers(tokenizer: Any) -> ReasoningMarkers | None:
    vocab = tokenizer.get_vocab()
    for open_marker, close_marker in KNOWN_MARKERS:
        if open_marker in vocab and close_marker in vocab:
            return ReasoningMarkers(open_marker, close_marker)
    return None


def prompt_opens_reasoning(prompt: str, markers: ReasoningMarkers | None) -> bool:
    """True when the rendered prompt ends inside an open reasoning block."""
    if markers is None:
        return False
    opened = prompt.rfind(markers.open)
    return opened >= 0 and prompt.rfind(markers.close) < opened


def _partial_suffix(text: str, marker: str) -> int:
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


class ReasoningSplitter:
    """Streaming router of text into (channel, piece) pairs.

    Whitespace right after a marker (the "\\n" after `<think>`, the "\\n\\n" after
    `</think>`) is dropped so that content does not start with blank lines.
    """

    def __init__(self, markers: ReasoningMarkers | None, *, in_reasoning: bool = False) -> None:
        self._markers = markers
        self.in_reasoning = in_reasoning and markers is not None
        self._held = ""
        self._strip_leading = self.in_reasoning
        self.saw_reasoning = self.in_reasoning

    def _emit(self, piece: str) -> Iterator[tuple[Channel, str]]:
        if self._strip_leading:
            piece = piece.lstrip()
            if not piece:
                return
            self._strip_leading = False
        if piece:
            yield ("reasoning" if self.in_reasoning else "content"), piece

    def push(self, text: str) -> list[tuple[Channel, str]]:
        if self._markers is None:
            return [("content", text)] if text else []
        out: list[tuple[Channel, str]] = []
        buffer = self._held + text
        self._held = ""
        while buffer:
            marker = self._markers.close if self.in_reasoning else self._markers.open
            found = buffer.find(marker)
            if found < 0:
                keep = _partial_suffix(buffer, marker)
                out.extend(self._emit(buffer[: len(buffer) - keep]))
                self._held = buffer[len(buffer) - keep :]
                break
            out.extend(self._emit(buffer[:found]))
            buffer = buffer[found + len(marker) :]
            self.in_reasoning = not self.in_reasoning
            self.saw_reasoning = True
            self._strip_leading = True
        return out

    def flush(self) -> list[tuple[Channel, str]]:
        held, self._held = self._held, ""
        return list(self._emit(held))


def wrap_reasoning(
    pieces: list[tuple[Channel, str]], markers: ReasoningMarkers | None, *, inside: bool
) -> tuple[list[str], bool]:
    """For `x-include-thinking`: reasoning goes back into content inside literal markers.

    Returns the content pieces and whether a block is still open after them (the caller
    closes it before finishing, so the block is always balanced).
    """
    open_marker, close_marker = (markers.open, markers.close) if markers else ("", "")
    out: list[str] = []
    for channel, piece in pieces:
        if channel == "reasoning" and not inside:
            out.append(open_marker)
            inside = True
        elif channel == "content" and inside:
            out.append(close_marker)
            inside = False
        out.append(piece)
    return [piece for piece in out if piece], inside
