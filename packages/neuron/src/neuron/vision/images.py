"""Image bytes -> a checked RGB picture, before any model sees it."""

from __future__ import annotations

import io
import warnings
from typing import Any

from neuron.vision.sources import ImageRefused

# Formats a browser or an SDK sends; others (PSD, EPS with Ghostscript, ...) are refused.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


def decode_image(data: bytes, where: str, *, max_source_pixels: int) -> Any:
    """A PIL RGB image. The size is read from the header and checked before the pixels are
    decoded, so a small file that expands to gigabytes (a decompression bomb) is refused
    without the memory ever being taken."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # PIL warns (and past twice its limit raises) on huge images; our own cap decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            picture = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = picture.size
            if width * height > max_source_pixels:
                raise ImageRefused(
                    where,
                    f"image is {width}x{height} pixels, more than vision.max_source_pixels "
                    f"({max_source_pixels})",
                    "image_too_large",
                )
            picture.load()
            return picture.convert("RGB")
    except ImageRefused:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise ImageRefused(where, f"not a decodable image ({exc})", "image_invalid") from exc
