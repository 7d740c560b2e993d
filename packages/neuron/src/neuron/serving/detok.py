"""Incremental detokenisation: token ids in, text deltas out, never a broken character.

Decoding one token at a time is wrong twice over: byte-level tokens can carry part of a
UTF-8 sequence (the decoder then yields U+FFFD), and SentencePiece-style decoders drop or
add a leading space depending on what precedes a token. So each step decodes a short window
that starts a few tokens back (the *prefix*), and emits only what the new tokens added to
the window's text — and only once that text no longer ends in U+FFFD (an unfinished
character). `flush` emits whatever is still held when the sequence ends.

Special tokens are dropped, except the ones the reasoning and tool parsers need to see
(`<think>`, `[TOOL_CALLS]`, `<|python_tag|>`, ...), which are passed in as `keep`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

REPLACEMENT_CHAR = "\ufffd"
# A UTF-8 character is at most 4 bytes; a tail still unfinished after this many tokens is
# really invalid (random weights do that) and is emitted as U+FFFD rather than held forever.
MAX_HELD_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, *, keep: Iterable[int] = ()) -> None:
        self._tokenizer = tokenizer
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self._dropped = frozenset(special - set(keep))
        self._ids: list[int] = []
        # _ids[prefix:read] is text already emitted that gives the decoder its context;
        # _ids[read:] is not emitted yet.
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        text: str = self._tokenizer.decode(ids, skip_special_tokens=False)
        return text

    def push(self, token_id: int) -> str:
        if token_id in self._dropped:
            return ""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        unfinished = full_text.endswith(REPLACEMENT_CHAR) and len(self._ids) - self._read < MAX_HELD_TOKENS
        if len(full_text) > len(prefix_text) and not unfinished:
            self._prefix = self._read
            self._read = len(self._ids)
            return full_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """The held-back tail at the end of the sequence (may contain U+FFFD if the model
        really produced an invalid byte sequence)."""
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return full_text[len(prefix_text) :]


def marker_token_ids(tokenizer: Any, markers: Iterable[str]) -> set[int]:
    """Ids of the marker strings that are single tokens in the vocabulary."""
    vocab = tokenizer.get_vocab()
    return {vocab[marker] for marker in markers if marker in vocab}
