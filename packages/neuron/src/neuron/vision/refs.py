"""The image parts of a chat request, in prompt order, with where each one was."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ImageRef:
    """An image part of a request: its URL (or data URI) and where it was, for errors."""

    url: str
    where: str


def image_refs(messages: Sequence[Mapping[str, Any]]) -> list[ImageRef]:
    """Every image part of OpenAI chat messages (plain dicts), in order. The Anthropic
    `image` block and the Responses `input_image` arrive here as `image_url` parts (the
    dialects translate them), so this one shape covers all three."""
    refs: list[ImageRef] = []
    for m, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for p, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "image_url":
                continue
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, Mapping) else image_url
            refs.append(ImageRef(str(url or ""), f"messages[{m}].content[{p}].image_url"))
    return refs
