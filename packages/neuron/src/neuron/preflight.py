"""Checks made before any weight is read: can transformers build it, is everything there, does it fit.

Each refusal is an ApiError 422 whose message names the model, the reason and what would
work, so a user (or the gateway, which relays it) can act on it. Sizes come from the files'
own headers - the safetensors JSON header and the GGUF tensor table - so nothing is loaded
to find out that it would not fit.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cortex_core.errors import ApiError

MIB = 1024 * 1024
# Memory beyond the weights a loaded model needs before its first request: activations, the
# first KV blocks, allocator slack. The ratio covers big models, the floor tiny ones.
RUNTIME_OVERHEAD_RATIO = 0.10
RUNTIME_OVERHEAD_FLOOR = 256 * MIB

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")

_SAFETENSORS_FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
_SAFETENSORS_OTHER_DTYPES = {
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}
_TORCH_DTYPE_SIZES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8}


def supported_model_types() -> list[str]:
    """Every model_type transformers' AutoModelForCausalLM can build, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(str(name) for name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def supported_gguf_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(str(name) for name in GGUF_SUPPORTED_ARCHITECTURES)


def _listing(names: list[str]) -> str:
    # All of them: the one the user hoped for must be findable in the message.
    return ", ".join(names)


def read_model_config(model_id: str, folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ApiError(
            422,
            f"model '{model_id}' has no config.json in {folder}; a Hugging Face model folder needs one "
            "(a GGUF file carries its own)",
            code="missing_files",
            extras={"missing": ["config.json"]},
        ) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(
            422, f"config.json of model '{model_id}' is not valid JSON: {exc}", code="invalid_config"
        ) from exc
    if not isinstance(config, dict):
        raise ApiError(422, f"config.json of model '{model_id}' is not a JSON object", code="invalid_config")
    return config


def check_architecture(model_id: str, config: Mapping[str, Any], supported: list[str]) -> str:
    """The model_type when transformers can build it as a causal LM; a 422 naming it otherwise."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if not isinstance(model_type, str) or not model_type:
        raise ApiError(
            422,
            f"config.json of model '{model_id}' has no `model_type`, so its architecture cannot be chosen "
            f"(architectures={architectures}); supported model types: {_listing(supported)}",
            code="unsupported_architecture",
        )
    if model_type not in supported:
        raise ApiError(
            422,
            f"unsupported model_type '{model_type}' for model '{model_id}' (architectures={architectures}): "
            f"transformers cannot build it as a causal language model here. Supported model types: "
            f"{_listing(supported)}",
            code="unsupported_architecture",
            extras={"model_type": model_type},
        )
    return model_type


# The layer kinds the torch engine computes (engine/hf_runner.py): attention over the paged
# K/V pool, and Gated DeltaNet linear attention with its per-sequence state.
SERVABLE_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "linear_attention"})


def check_layer_types(model_id: str, config: Mapping[str, Any]) -> None:
    """A 422 naming the model_type and its layer kinds when the engine cannot compute them,
    read from config.json (the text model's, for a vision-language checkpoint) before any
    weight is."""
    nested = config.get("text_config")
    text = nested if isinstance(nested, Mapping) else config
    kinds = text.get("layer_types") or []
    unknown = sorted({str(kind) for kind in kinds} - SERVABLE_LAYER_TYPES)
    if unknown:
        model_type = config.get("model_type")
        raise ApiError(
            422,
            f"model '{model_id}' (model_type '{model_type}') has {unknown} layers, which the torch engine "
            f"cannot compute; it serves {sorted(SERVABLE_LAYER_TYPES)} layers",
            code="unsupported_architecture",
            extras={"model_type": model_type},
        )


def check_gguf_architecture(model_id: str, architecture: str, supported: list[str]) -> str:
    # llama.cpp writes `qwen3moe` where transformers says `qwen3_moe`.
    candidates = {architecture, architecture.replace("-", "_"), architecture.replace("moe", "_moe")}
    if not candidates & set(supported):
        raise ApiError(
            422,
            f"unsupported GGUF architecture '{architecture}' for model '{model_id}': transformers can read "
            f"GGUF files of {_listing(supported)}; use a safetensors release of this model instead",
            code="unsupported_architecture",
            extras={"model_type": architecture},
        )
    return architecture


# --- files ---------------------------------------------------------------------------------


def missing_files(folder: Path, required: Iterable[str], *, needs_tokenizer: bool) -> list[str]:
    missing = [name for name in required if not (folder / name).is_file()]
    if needs_tokenizer and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES))
    return missing


def check_files(model_id: str, folder: Path, required: Iterable[str], *, needs_tokenizer: bool) -> None:
    missing = missing_files(folder, required, needs_tokenizer=needs_tokenizer)
    if missing:
        raise ApiError(
            422,
            f"model '{model_id}' is missing {', '.join(missing)} in {folder}; complete the download "
            "(for a hub model: load it once with network access, or `hf download <org/name>`) or add the files",
            code="missing_files",
            extras={"missing": missing},
        )


# --- sizes ---------------------------------------------------------------------------------


def safetensors_bytes(path: Path, target_itemsize: int | None) -> int:
    """Bytes the tensors of one safetensors file take once floats are cast to `target_itemsize`."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    total = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for dim in entry["shape"]:
            count *= dim
        dtype = entry["dtype"]
        if dtype in _SAFETENSORS_FLOAT_DTYPES:
            total += count * (target_itemsize or _SAFETENSORS_FLOAT_DTYPES[dtype])
        else:
            total += count * _SAFETENSORS_OTHER_DTYPES.get(dtype, 1)
    return total


@dataclass(frozen=True)
class GgufSummary:
    architecture: str
    # Number of weights over all tensors (dequantised, each becomes one float).
    elements: int


# GGUF metadata value types -> fixed size in bytes (8 = string, 9 = array are variable).
_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def read_gguf_summary(path: Path) -> GgufSummary:
    """Architecture and weight count from a GGUF header, skipping the (often large) vocabulary fast."""
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF":
            raise ValueError(f"{path.name} is not a GGUF file (bad magic)")
        version, tensor_count, kv_count = struct.unpack_from("<IQQ", data, 4)
        if version < 2:
            raise ValueError(f"{path.name} uses GGUF version {version}; only version 2 and later are read")
        offset = 24

        def read_string(at: int) -> tuple[str, int]:
            (length,) = struct.unpack_from("<Q", data, at)
            start = at + 8
            return bytes(data[start : start + length]).decode("utf-8", "replace"), start + length

        def skip_value(kind: int, at: int) -> int:
            if kind in _GGUF_SCALAR_SIZES:
                return at + _GGUF_SCALAR_SIZES[kind]
            if kind == 8:
                length: int = struct.unpack_from("<Q", data, at)[0]
                return at + 8 + length
            if kind == 9:
                item_kind: int = struct.unpack_from("<I", data, at)[0]
                count: int = struct.unpack_from("<Q", data, at + 4)[0]
                at += 12
                if item_kind in _GGUF_SCALAR_SIZES:
                    return at + count * _GGUF_SCALAR_SIZES[item_kind]
                for _ in range(count):
                    at = skip_value(item_kind, at)
                return at
            raise ValueError(f"{path.name}: unknown GGUF value type {kind}")

        architecture = ""
        for _ in range(kv_count):
            key, offset = read_string(offset)
            (kind,) = struct.unpack_from("<I", data, offset)
            offset += 4
            if key == "general.architecture" and kind == 8:
                architecture, offset = read_string(offset)
            else:
                offset = skip_value(kind, offset)
        elements = 0
        for _ in range(tensor_count):
            _name, offset = read_string(offset)
            (n_dims,) = struct.unpack_from("<I", data, offset)
            dims = struct.unpack_from(f"<{n_dims}Q", data, offset + 4)
            offset += 4 + 8 * n_dims + 4 + 8  # dims, then ggml type and data offset
            count = 1
            for dim in dims:
                count *= dim
            elements += count
    return GgufSummary(architecture=architecture, elements=elements)


def config_dtype_itemsize(config: Mapping[str, Any]) -> int | None:
    dtype = config.get("dtype") or config.get("torch_dtype")
    return _TORCH_DTYPE_SIZES.get(str(dtype).removeprefix("torch.")) if dtype else None


def required_bytes(weight_bytes: int) -> int:
    return weight_bytes + max(RUNTIME_OVERHEAD_FLOOR, int(weight_bytes * RUNTIME_OVERHEAD_RATIO))


def check_fit(model_id: str, weight_bytes: int, free_bytes: int, where: str) -> None:
    """Refuse when weights plus runtime overhead exceed the chosen device's free memory."""
    need = required_bytes(weight_bytes)
    if need > free_bytes:
        raise ApiError(
            422,
            f"model '{model_id}' does not fit on {where}: it needs about {need // MIB} MiB "
            f"({weight_bytes // MIB} MiB of weights plus runtime overhead) but only {free_bytes // MIB} MiB "
            "is free; unload another model, choose a device with more free memory, or use a smaller or "
            "quantised variant",
            code="insufficient_memory",
            extras={"required_mb": need // MIB, "free_mb": free_bytes // MIB},
        )


def replicated_weight_bytes(hf_config: Any, itemsize: int) -> int:
    """Bytes of the weights every tensor-parallel rank holds whole: the input embedding and,
    when it is not tied to it, the output one (norms are negligible)."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    vocab = int(getattr(text, "vocab_size", 0) or 0)
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    copies = 1 if getattr(text, "tie_word_embeddings", False) else 2
    return copies * vocab * hidden * itemsize


def tensor_parallel_rank_bytes(weight_bytes: int, replicated_bytes: int, world_size: int) -> int:
    """One rank's weights: the replicated ones whole plus its 1/world of the rest (not
    weight_bytes / world: the embeddings of a small model can be a third of it)."""
    replicated = min(max(replicated_bytes, 0), weight_bytes)
    return replicated + -(-(weight_bytes - replicated) // max(world_size, 1))


def torch_itemsize(dtype: str) -> int:
    """Bytes per element of a torch dtype name as choose_dtype gives it."""
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
