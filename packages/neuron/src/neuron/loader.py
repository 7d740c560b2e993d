"""Turning a folder of files into a transformers model, on the device's owner thread.

`load_checkpoint` and `release_memory` do torch work and must run on the DeviceWorker of the
device they touch (CUDA context locality); everything else here is plain file reading.
"""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class LoadedCheckpoint:
    model: Any  # transformers PreTrainedModel, in eval mode, on its device
    tokenizer: Any
    hf_config: Any
    generation_config: dict[str, Any]
    chat_template: str | None
    # Bytes taken by parameters and buffers (what unloading gives back).
    memory_bytes: int
    dtype: str
    # Loaded with its vision tower (a vision-language checkpoint with an image processor).
    vision: bool = False


def device_name(device: int | None) -> str:
    return "cpu" if device is None else f"cuda:{device}"


def choose_dtype(device: int | None, config_dtype: str | None, *, bf16_supported: bool = True) -> str:
    """bf16 on a GPU that computes in it (compute capability 8.0 on: Ampere and later), else
    fp16; on the CPU the checkpoint's own dtype, except float16 (slow on CPUs) -> float32."""
    if device is not None:
        return "bfloat16" if bf16_supported else "float16"
    dtype = (config_dtype or "float32").removeprefix("torch.")
    if dtype in ("float16", "half"):
        return "float32"
    return dtype if dtype in ("float32", "bfloat16") else "float32"


def gpu_has_bf16(capability: tuple[int, int]) -> bool:
    """bf16 arithmetic in hardware starts with Ampere (8.0); older cards emulate it slowly or not at all."""
    return capability >= (8, 0)


def bind_device(device: int | None) -> None:
    """Make `device` the calling thread's current CUDA device (a device worker's first job)."""
    if device is not None:
        import torch

        torch.cuda.set_device(device)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def read_chat_template(folder: Path, tokenizer: Any | None = None) -> str | None:
    """chat_template.jinja -> chat_template.json -> tokenizer_config.json (transformers' order).

    A GGUF file carries its template in its metadata; the tokenizer loaded from it has it, and
    it is used when no file in the folder provides one.
    """
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    as_json = folder / "chat_template.json"
    if as_json.is_file():
        template = _read_json(as_json).get("chat_template")
        if isinstance(template, str):
            return template
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        template = _read_json(tokenizer_config).get("chat_template")
        if isinstance(template, str):
            return template
        if isinstance(template, list):
            # Several named templates: the one called "default" is the chat template.
            named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
            if isinstance(named.get("default"), str):
                return str(named["default"])
    from_tokenizer = getattr(tokenizer, "chat_template", None)
    return from_tokenizer if isinstance(from_tokenizer, str) else None


def read_generation_config(folder: Path) -> dict[str, Any]:
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    config = _read_json(path)
    return config if isinstance(config, dict) else {}


def has_vision(folder: Path) -> bool:
    """A vision-language checkpoint this neuron serves images for: a supported model_type
    with a vision config, and the image processor's preprocessor_config.json beside it."""
    from neuron.vision.prepare import PREPROCESSOR_CONFIG
    from neuron.vision.tower import VISION_MODEL_TYPES

    config_file = folder / "config.json"
    if not config_file.is_file() or not (folder / PREPROCESSOR_CONFIG).is_file():
        return False
    config = _read_json(config_file)
    return config.get("model_type") in VISION_MODEL_TYPES and isinstance(config.get("vision_config"), dict)


def load_checkpoint(folder: Path, gguf_file: str | None, device: int | None) -> LoadedCheckpoint:
    """Load tokenizer and model from `folder` onto `device` (None = CPU). Runs on the owner thread."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    has_config = (folder / "config.json").is_file()
    config_dtype = _read_json(folder / "config.json").get("dtype") if has_config else None
    if has_config and config_dtype is None:
        config_dtype = _read_json(folder / "config.json").get("torch_dtype")
    bf16 = device is None or gpu_has_bf16(torch.cuda.get_device_capability(device))
    dtype = choose_dtype(device, config_dtype, bf16_supported=bf16)
    if not bf16 and config_dtype in ("bfloat16", "torch.bfloat16"):
        log.warning(
            "%s has no bf16 (compute capability below 8.0): the bf16 checkpoint runs in fp16, "
            "whose narrower range can overflow in some models",
            device_name(device),
        )
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    if device is not None:
        # Straight onto the GPU, tensor by tensor, rather than the whole model in host RAM
        # first and then a copy: host memory stays near one tensor, not one model.
        kwargs["device_map"] = {"": device_name(device)}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
        if has_config:
            # transformers' GGUF config mapping misses some keys (qwen3 head_dim); a config.json
            # next to the file is the authoritative one.
            kwargs["config"] = AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, **({"gguf_file": gguf_file} if gguf_file else {}))
    vision = not gguf_file and has_vision(folder)
    # A vision checkpoint with its image processor: the whole model (tower included);
    # otherwise its text model only, as AutoModelForCausalLM builds it.
    auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    model: Any = auto.from_pretrained(folder, **kwargs)
    model.to(torch.device(device_name(device)))
    model.eval()
    generation_config = read_generation_config(folder)
    if not generation_config and getattr(model, "generation_config", None) is not None:
        # No file (typical for GGUF): the stop ids transformers derived from the model's metadata.
        derived = model.generation_config.to_diff_dict()
        generation_config = {key: derived[key] for key in ("eos_token_id", "pad_token_id") if key in derived}
    memory = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return LoadedCheckpoint(
        model=model,
        tokenizer=tokenizer,
        hf_config=model.config,
        generation_config=generation_config,
        chat_template=read_chat_template(folder, tokenizer),
        memory_bytes=memory,
        dtype=dtype,
        vision=vision,
    )


def release_memory(device: int | None) -> int | None:
    """After the last reference to a model is dropped: collect it and give the device's cached
    blocks back to the driver. Returns the bytes this process's CUDA allocator gave back on
    `device` (None for the CPU, where the allocator is the host's)."""
    gc.collect()
    if device is None:
        return None
    import torch

    where = torch.device(device_name(device))
    before = torch.cuda.memory_reserved(where)
    # empty_cache frees the current device's cache: make sure that is this one.
    with torch.cuda.device(where):
        torch.cuda.empty_cache()
    return max(0, before - torch.cuda.memory_reserved(where))


@dataclass
class CheckpointMetadata:
    tokenizer: Any
    hf_config: Any
    generation_config: dict[str, Any]
    chat_template: str | None


def read_metadata(folder: Path) -> CheckpointMetadata:
    """Tokenizer, config and template without the weights (a tensor-parallel model's ranks load those)."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return CheckpointMetadata(
        tokenizer,
        AutoConfig.from_pretrained(folder),
        read_generation_config(folder),
        read_chat_template(folder, tokenizer),
    )
