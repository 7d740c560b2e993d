"""A prompt's images as the engine receives them, and what the vision tower made of them.

`ImageInput` is built off the device (pixels through the model's image processor, the
prompt's placeholder tokens expanded); `EncodedImages` is computed from it on the owner
thread at the sequence's first prefill and kept with it, so a later chunk, a decode step or
a recompute after preemption reuses it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class EncodedImages:
    """The vision tower's output for one prompt, on the model's device."""

    # One row per placeholder token, in prompt order.
    embeds: torch.Tensor
    # Qwen3-VL's deepstack: per early decoder layer, features added at the same positions.
    deepstack: tuple[torch.Tensor, ...]
    # M-RoPE (temporal, height, width) position of every prompt position, [3, prompt_len].
    positions: torch.Tensor
    # After the prompt, position p is rotated as p + delta on all three axes.
    delta: int
    # Per prompt position, the row of `embeds` it takes (-1: a text token), [prompt_len].
    ordinal: torch.Tensor


def image_salt(digest: bytes) -> int:
    """A prefix-cache stand-in for a placeholder token of the image with `digest`: negative,
    so it never equals a real token id, and different for different pixels."""
    return -1 - int.from_bytes(digest[:8], "big")


def pixel_digest(pixels: bytes, grid: Sequence[int]) -> bytes:
    """SHA-256 of an image's processed pixels and its patch grid (two pictures that the
    processor maps to the same patches give the same K/V, so they may share it)."""
    digest = hashlib.sha256(repr(tuple(int(n) for n in grid)).encode())
    digest.update(pixels)
    return digest.digest()


@dataclass(eq=False)
class ImageInput:
    """The images of one prompt: processed pixels, their grids and placeholder positions."""

    pixel_values: torch.Tensor  # [patches of every image, patch features], CPU
    grid_thw: torch.Tensor  # [images, 3]
    token_id: int  # the placeholder token the prompt repeats once per merged patch
    merge_size: int  # patches merged per side into one placeholder token
    prompt_ids: tuple[int, ...]
    digests: tuple[bytes, ...]  # one per image, in prompt order
    # Filled on the owner thread at the first prefill (vision tower + M-RoPE positions).
    encoded: EncodedImages | None = field(default=None, repr=False)
    key_ids: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Prefix-cache keys: the prompt with each image's placeholders replaced by a salt
        # from that image's pixels, so two prompts whose text and placeholder counts match
        # but whose pictures differ never share K/V (docs/vision.md).
        counts = self.placeholder_counts()
        salts = [image_salt(d) for d in self.digests]
        if len(counts) != len(salts):
            raise ValueError(f"{len(salts)} image digests for {len(counts)} images")
        per_token = iter([salt for salt, count in zip(salts, counts, strict=True) for _ in range(count)])
        self.key_ids = tuple(next(per_token) if t == self.token_id else t for t in self.prompt_ids)

    def placeholder_counts(self) -> list[int]:
        """Placeholder tokens per image: its patches / merge² (the grid is in patches)."""
        return [int(t * h * w) // self.merge_size**2 for t, h, w in self.grid_thw.tolist()]

    @property
    def image_tokens(self) -> int:
        return sum(1 for t in self.prompt_ids if t == self.token_id)
