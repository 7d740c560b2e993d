"""A vision model's image processor and placeholders: pictures + prompt ids -> engine input.

The processor is the checkpoint's own (`preprocessor_config.json`) on its PIL backend:
`AutoProcessor` would also build the video processor, which needs torchvision, whose wheels
do not load with the CPU torch build (so the neuron never requires it). The chat template
writes one image placeholder per picture; it is expanded here to one token per merged
patch, as the model's processor does, so `usage.prompt_tokens` counts the image tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cortex_core.config.neuron import VisionConfig
from cortex_core.errors import ApiError
from neuron.vision.images import decode_image
from neuron.vision.inputs import ImageInput, pixel_digest
from neuron.vision.refs import ImageRef
from neuron.vision.sources import FetchPolicy, ImageFetcher, ImageRefused

PREPROCESSOR_CONFIG = "preprocessor_config.json"


@dataclass(frozen=True)
class ImageLimits:
    # Pixels of one image after resizing (the processor's longest_edge is capped to this).
    max_pixels: int
    # Pixels of one image as sent (checked from its header before decoding).
    max_source_pixels: int
    max_images: int


def fetch_policy(config: VisionConfig) -> FetchPolicy:
    return FetchPolicy(
        fetch_urls=config.fetch_urls,
        allowed_hosts=frozenset(host.lower() for host in config.allowed_hosts),
        max_bytes=config.max_image_bytes,
        timeout_secs=config.fetch_timeout_secs,
        max_redirects=config.max_redirects,
    )


def image_limits(config: VisionConfig) -> ImageLimits:
    return ImageLimits(
        max_pixels=config.max_pixels, max_source_pixels=config.max_source_pixels, max_images=config.max_images
    )


class ImagePreparer:
    """Built once per loaded vision model (serving side, no device work)."""

    def __init__(
        self,
        processor: Any,
        *,
        token_id: int,
        merge_size: int,
        limits: ImageLimits,
        fetcher: ImageFetcher | None = None,
    ) -> None:
        self.processor = processor
        self.token_id = token_id
        self.merge_size = merge_size
        self.limits = limits
        self.fetcher = fetcher or ImageFetcher(FetchPolicy())
        shortest = int(processor.size.shortest_edge)
        longest = min(int(processor.size.longest_edge), limits.max_pixels)
        # The cap wins over the checkpoint's minimum too: one image never exceeds max_pixels.
        self._size = {"shortest_edge": min(shortest, longest), "longest_edge": longest}

    @classmethod
    def for_neuron(cls, folder: Path, hf_config: Any, config: VisionConfig) -> ImagePreparer:
        """With the neuron's `[vision]` limits and URL policy."""
        return cls.from_checkpoint(
            folder, hf_config, image_limits(config), fetcher=ImageFetcher(fetch_policy(config))
        )

    @classmethod
    def from_checkpoint(
        cls, folder: Path, hf_config: Any, limits: ImageLimits, *, fetcher: ImageFetcher | None = None
    ) -> ImagePreparer:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(folder, backend="pil")  # type: ignore[no-untyped-call]
        return cls(
            processor,
            token_id=int(hf_config.image_token_id),
            merge_size=int(hf_config.vision_config.spatial_merge_size),
            limits=limits,
            fetcher=fetcher,
        )

    def prepare(
        self, prompt_ids: Sequence[int], refs: Sequence[ImageRef], model_id: str
    ) -> tuple[list[int], ImageInput]:
        """Fetch or decode every image, check it, and attach it to the prompt (blocking:
        a request's worker thread runs it)."""
        if len(refs) > self.limits.max_images:
            raise ImageRefused(
                refs[self.limits.max_images].where,
                f"{len(refs)} images, more than vision.max_images ({self.limits.max_images})",
                "too_many_images",
            )
        pictures = [
            decode_image(
                self.fetcher.load(ref.url, ref.where),
                ref.where,
                max_source_pixels=self.limits.max_source_pixels,
            )
            for ref in refs
        ]
        return self.attach(prompt_ids, pictures, model_id, [ref.where for ref in refs])

    def attach(
        self,
        prompt_ids: Sequence[int],
        pictures: Sequence[Any],
        model_id: str,
        wheres: Sequence[str] | None = None,
    ) -> tuple[list[int], ImageInput]:
        """The prompt with each image's placeholder repeated once per merged patch, and the
        engine's `ImageInput`. `pictures` are PIL RGB images in prompt order; `wheres` name
        them in errors."""
        import numpy as np
        import torch

        slots = sum(1 for t in prompt_ids if t == self.token_id)
        if slots != len(pictures):
            raise ApiError(
                400,
                f"the chat template of model '{model_id}' placed {slots} image placeholders for "
                f"{len(pictures)} images (or the text contains the image placeholder token)",
                code="invalid_request_body",
            )
        names = list(wheres or [f"image {index + 1}" for index in range(len(pictures))])
        patches: list[Any] = []
        grids: list[list[int]] = []
        for picture, where in zip(pictures, names, strict=True):
            # One image at a time, so a refusal names it (the processor treats images
            # independently: the same patches as one batched call).
            try:
                batch = self.processor(images=[picture], size=self._size, return_tensors="np")
            except ValueError as exc:  # e.g. an aspect ratio beyond what the model resizes to
                raise ImageRefused(
                    where, f"the model's image processor refused it ({exc})", "image_invalid"
                ) from exc
            patches.append(batch["pixel_values"])
            grids.append([int(n) for n in batch["image_grid_thw"][0]])
        digests = tuple(pixel_digest(p.tobytes(), grid) for p, grid in zip(patches, grids, strict=True))
        # NumPy out of the processor, joined by NumPy and wrapped by torch.from_numpy (no
        # copy, no parallel region: this runs on a request thread, never the device's owner
        # thread, where a second OpenMP team would slow every step).
        pixels = torch.from_numpy(np.ascontiguousarray(np.concatenate(patches)))
        grid = torch.tensor(grids, dtype=torch.long)
        counts = iter(t * h * w // self.merge_size**2 for t, h, w in grids)
        expanded: list[int] = []
        for token in prompt_ids:
            expanded.extend([token] * next(counts) if token == self.token_id else [token])
        images = ImageInput(
            pixel_values=pixels,
            grid_thw=grid,
            token_id=self.token_id,
            merge_size=self.merge_size,
            prompt_ids=tuple(expanded),
            digests=digests,
        )
        return expanded, images
