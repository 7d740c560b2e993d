"""A vision-language checkpoint's vision side, run on the device's owner thread.

The model's own code does the work: `get_image_features` (the vision tower, and Qwen3-VL's
deepstack features) and `get_rope_index` (M-RoPE positions for the whole prompt and the
delta that shifts every position after it). The runner then feeds the language model
directly: token embeddings with the image rows scattered in, four rows of position ids
(the sequence position, which the causal mask and the paged K/V use, then the three M-RoPE
axes), so text and image sequences share one forward.
"""

from __future__ import annotations

from typing import Any

import torch

from neuron.vision.inputs import EncodedImages, ImageInput

# Checkpoints whose vision side this module drives: a `model.visual` tower, a
# `model.language_model`, `get_image_features` and `get_rope_index` with mm_token_type_ids.
VISION_MODEL_TYPES = frozenset({"qwen3_5", "qwen3_5_moe", "qwen3_vl", "qwen3_vl_moe", "qwen2_5_vl"})


def supports_vision(config: Any) -> bool:
    """Whether a checkpoint's config.json describes a vision model this neuron can serve."""
    return getattr(config, "model_type", None) in VISION_MODEL_TYPES and hasattr(config, "vision_config")


class VisionTower:
    """The vision side and the decoder of a loaded `...ForConditionalGeneration` model."""

    def __init__(self, model: Any) -> None:
        self.core = model.model
        self.language_model = model.model.language_model
        self.lm_head = model.lm_head
        self.image_token_id = int(model.config.image_token_id)
        self.merge_size = int(model.config.vision_config.spatial_merge_size)
        # Qwen3-VL adds vision features to the first decoder layers' outputs too.
        self.deepstack = bool(getattr(model.config.vision_config, "deepstack_visual_indexes", None))

    @classmethod
    def of(cls, model: Any) -> VisionTower | None:
        if not supports_vision(model.config):
            return None
        core = getattr(model, "model", None)
        if getattr(core, "visual", None) is None or getattr(core, "language_model", None) is None:
            return None
        return cls(model)

    @torch.inference_mode()
    def encode(self, images: ImageInput, device: torch.device, dtype: torch.dtype) -> EncodedImages:
        grid = images.grid_thw.to(device)
        out = self.core.get_image_features(images.pixel_values.to(device), grid, return_dict=True)
        embeds = torch.cat(list(out.pooler_output)).to(dtype)
        deepstack = tuple(
            torch.cat(list(layer)).to(dtype) for layer in (getattr(out, "deepstack_features", None) or ())
        )
        ids = torch.tensor([images.prompt_ids], device=device)
        placeholders = ids[0] == images.token_id
        if int(placeholders.sum()) != embeds.shape[0]:
            raise ValueError(
                f"the prompt has {int(placeholders.sum())} image placeholder tokens, the vision tower "
                f"made {embeds.shape[0]} image features"
            )
        positions, deltas = self.core.get_rope_index(
            ids, mm_token_type_ids=placeholders[None].int(), image_grid_thw=grid
        )
        ordinal = torch.where(placeholders, placeholders.long().cumsum(0) - 1, -1)
        return EncodedImages(
            embeds=embeds,
            deepstack=deepstack,
            positions=positions[:, 0],
            delta=int(deltas.reshape(-1)[0]),
            ordinal=ordinal,
        )
