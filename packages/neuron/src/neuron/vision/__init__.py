"""Image input for vision-language checkpoints (Qwen3.5 / Qwen3.6, Qwen3-VL, Qwen2.5-VL).

- `refs.py`: the image parts of a chat request, in prompt order, named for errors.
- `sources.py`: where an image's bytes come from: data URIs always, http(s) only when the
  operator allows it, through an SSRF guard (allow-listed hosts, public addresses only,
  checked after DNS resolution and on every redirect, size cap, deadline, content type).
- `images.py`: bytes -> a checked RGB picture (format, dimensions, decompression bombs).
- `prepare.py`: the model's own image processor (its PIL backend: never torchvision) and
  the prompt's placeholder tokens, one per merged patch; what the engine receives.
- `inputs.py`: what the engine receives (`ImageInput`, with prefix-cache keys salted by
  each image's pixel hash) and what the tower made of it (`EncodedImages`).
- `tower.py`: on the device's owner thread, the model's vision tower and M-RoPE positions.

docs/vision.md describes the whole path, the SSRF rules and the errors.
"""
