"""Test pictures and transformers' own greedy reference for vision-language models."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any


def picture(seed: int, width: int = 90, height: int = 70) -> Any:
    """A random RGB picture (PIL); different seeds give different pixels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def plain(width: int, height: int, color: tuple[int, int, int] = (200, 120, 40)) -> Any:
    """A one-colour picture: a few hundred bytes of PNG however large."""
    from PIL import Image

    return Image.new("RGB", (width, height), color)


def png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(image: Any) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def reference_vision_greedy(
    model: Any, images: Any, max_new_tokens: int, stops: frozenset[int]
) -> tuple[list[int], str]:
    """transformers' greedy generate() on the same prompt ids and pixels (an `ImageInput`)."""
    import torch

    ids = torch.tensor([list(images.prompt_ids)])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=images.pixel_values,
            image_grid_thw=images.grid_thw,
            mm_token_type_ids=(ids == images.token_id).int(),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(stops),
        )
    return cut_at_stop(out[0, ids.shape[1] :].tolist(), stops)


def cut_at_stop(tokens: Sequence[int], stops: frozenset[int]) -> tuple[list[int], str]:
    for i, token in enumerate(tokens):
        if token in stops:
            return list(tokens[:i]), "stop"
    return list(tokens), "length"
