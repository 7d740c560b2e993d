"""Token log-probabilities as the OpenAI wire formats show them: each token's text and bytes.

A token's `bytes` are its exact bytes, which may be part of a UTF-8 character (byte-level
BPE splits characters across tokens): decoding one token alone would give U+FFFD instead.
So the bytes come from the vocabulary itself: byte-level BPE vocabularies (GPT-2's scheme:
Llama 3, Qwen, SmolLM, ...) spell every byte as one printable character, SentencePiece
vocabularies spell a raw byte as `<0xNN>` and a space as `▁`, and added tokens (specials,
markers) are their own text. `token` is that text, with a byte that ends no character
written as `\\xNN`, as OpenAI does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_SENTENCEPIECE_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SENTENCEPIECE_SPACE = "\u2581"


def byte_level_alphabet() -> dict[str, int]:
    """The character GPT-2's byte-level BPE writes for each byte, inverted: printable Latin-1
    bytes stand for themselves, the others (controls, space, ...) are shifted past 255."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    shifted = 0
    alphabet: dict[str, int] = {}
    for byte in range(256):
        if byte in printable:
            alphabet[chr(byte)] = byte
        else:
            alphabet[chr(256 + shifted)] = byte
            shifted += 1
    return alphabet


def is_byte_level(tokenizer: Any) -> bool:
    """Whether the vocabulary is byte-level BPE: its decoder turns `Ġ` (byte 0x20) into a space."""
    try:
        return bool(tokenizer.convert_tokens_to_string(["\u0120"]) == " ")
    except (KeyError, TypeError, ValueError):
        return False


@dataclass(frozen=True)
class TokenText:
    token: str
    bytes: bytes


@dataclass(frozen=True)
class TokenLogprob:
    token: TokenText
    logprob: float


@dataclass(frozen=True)
class LogprobsDelta:
    """An output event: one generated token's log-probability and its top alternatives
    (most likely first), emitted before the text events the token produced."""

    chosen: TokenLogprob
    top: tuple[TokenLogprob, ...]


class TokenTexts:
    """Token id -> its text and bytes, for one tokenizer (`byte_level` from `is_byte_level`)."""

    def __init__(self, tokenizer: Any, *, byte_level: bool) -> None:
        self._tokenizer = tokenizer
        self._alphabet = byte_level_alphabet() if byte_level else None
        added: Mapping[int, Any] = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self._added = {token_id: str(getattr(token, "content", token)) for token_id, token in added.items()}

    def bytes_of(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode()
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str):
            return b""
        if self._alphabet is not None and all(char in self._alphabet for char in piece):
            return bytes(self._alphabet[char] for char in piece)
        byte = _SENTENCEPIECE_BYTE.fullmatch(piece)
        if byte is not None:
            return bytes([int(byte.group(1), 16)])
        if _SENTENCEPIECE_SPACE in piece:
            return piece.replace(_SENTENCEPIECE_SPACE, " ").encode()
        text: str = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return text.encode()

    def text_of(self, token_id: int) -> TokenText:
        raw = self.bytes_of(token_id)
        return TokenText(raw.decode("utf-8", errors="backslashreplace"), raw)

    def delta(self, token_id: int, logprob: float, top: tuple[tuple[int, float], ...]) -> LogprobsDelta:
        return LogprobsDelta(
            TokenLogprob(self.text_of(token_id), logprob),
            tuple(TokenLogprob(self.text_of(alternative), value) for alternative, value in top),
        )
