"""Pre-flight pieces: header-based sizes, architecture checks, the fit rule, device choice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.tiny_gguf import write_tiny_llama_gguf

from cortex_core.errors import ApiError
from neuron.loader import choose_dtype, read_chat_template
from neuron.preflight import (
    MIB,
    check_architecture,
    check_fit,
    check_gguf_architecture,
    check_layer_types,
    read_gguf_summary,
    replicated_weight_bytes,
    required_bytes,
    safetensors_bytes,
    supported_gguf_architectures,
    supported_model_types,
    tensor_parallel_rank_bytes,
)
from neuron.torch_harness import choose_device


def test_sizes_come_from_headers(tiny_llama: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    tensors = load_file(str(tiny_llama / "model.safetensors"))
    elements = sum(t.size for t in tensors.values())
    assert safetensors_bytes(tiny_llama / "model.safetensors", 2) == elements * 2
    assert safetensors_bytes(tiny_llama / "model.safetensors", None) == elements * 4  # stored as F32
    summary = read_gguf_summary(write_tiny_llama_gguf(tiny_llama, tmp_path / "t.gguf"))
    assert summary.architecture == "llama"
    assert summary.elements == elements  # tied lm_head: the same tensors
    (tmp_path / "bad.gguf").write_bytes(b"NOPE" + bytes(32))
    with pytest.raises(ValueError, match="bad magic"):
        read_gguf_summary(tmp_path / "bad.gguf")


def test_supported_lists_come_from_transformers() -> None:
    assert {"qwen3", "qwen3_moe", "llama"} <= set(supported_model_types())
    assert {"llama", "qwen3", "qwen3_moe"} <= set(supported_gguf_architectures())


@pytest.mark.parametrize(
    ("config", "accepted"),
    [
        ({"model_type": "qwen3"}, True),
        ({"model_type": "bert_for_sequence_labels"}, False),
        ({"architectures": ["Mystery"]}, False),
    ],
)
def test_check_architecture(config: dict[str, object], accepted: bool) -> None:
    supported = ["llama", "qwen3"]
    if accepted:
        assert check_architecture("o/m", config, supported) == config["model_type"]
        return
    with pytest.raises(ApiError) as caught:
        check_architecture("o/m", config, supported)
    assert caught.value.status == 422
    assert "'o/m'" in caught.value.message and "llama, qwen3" in caught.value.message


HYBRID_TYPES = ["linear_attention", "linear_attention", "linear_attention", "full_attention"]


@pytest.mark.parametrize(
    ("config", "refused"),
    [
        ({"model_type": "qwen3"}, None),
        ({"model_type": "gemma3_text", "layer_types": ["sliding_attention", "full_attention"]}, None),
        ({"model_type": "qwen3_next", "layer_types": HYBRID_TYPES}, None),
        ({"model_type": "qwen3_5", "text_config": {"layer_types": HYBRID_TYPES}}, None),
        (
            {"model_type": "llama4", "text_config": {"layer_types": ["chunked_attention"]}},
            "chunked_attention",
        ),
        ({"model_type": "mystery", "layer_types": ["full_attention", "mamba"]}, "mamba"),
    ],
)
def test_layer_types_are_checked_from_the_config(config: dict[str, object], refused: str | None) -> None:
    if refused is None:
        check_layer_types("o/m", config)
        return
    with pytest.raises(ApiError) as caught:
        check_layer_types("o/m", config)
    assert caught.value.status == 422
    assert refused in caught.value.message and str(config["model_type"]) in caught.value.message


def test_gguf_architecture_names_are_normalised() -> None:
    assert check_gguf_architecture("f.gguf", "qwen3moe", ["qwen3_moe"]) == "qwen3moe"
    with pytest.raises(ApiError, match="unsupported GGUF architecture 'rwkv7'"):
        check_gguf_architecture("f.gguf", "rwkv7", ["llama"])


@pytest.mark.parametrize(
    ("weights_mb", "free_mb", "fits"),
    [(1, 300, True), (1, 200, False), (10_000, 11_000, True), (10_000, 10_900, False)],
)
def test_fit_rule(weights_mb: int, free_mb: int, fits: bool) -> None:
    # Overhead: 10 % of the weights, at least 256 MiB.
    assert (required_bytes(weights_mb * MIB) <= free_mb * MIB) is fits
    if fits:
        check_fit("o/m", weights_mb * MIB, free_mb * MIB, "GPU 0")
    else:
        with pytest.raises(ApiError) as caught:
            check_fit("o/m", weights_mb * MIB, free_mb * MIB, "GPU 0")
        assert caught.value.extras["free_mb"] == free_mb


@pytest.mark.parametrize(
    ("requested", "free", "expected"),
    [
        (None, {}, None),
        (None, {0: 5, 1: 9}, 1),  # most free memory
        ([0], {0: 5, 1: 9}, 0),
        ([1, 0], {0: 5, 1: 9}, 1),
    ],
)
def test_choose_device(requested: list[int] | None, free: dict[int, int], expected: int | None) -> None:
    assert choose_device("o/m", requested, free, None) == expected


@pytest.mark.parametrize(
    ("device", "config_dtype", "expected"),
    [
        (0, "float32", "bfloat16"),
        (0, "bfloat16", "bfloat16"),
        (None, "bfloat16", "bfloat16"),
        (None, "float16", "float32"),
        (None, None, "float32"),
    ],
)
def test_choose_dtype(device: int | None, config_dtype: str | None, expected: str) -> None:
    assert choose_dtype(device, config_dtype) == expected


def test_chat_template_precedence(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": [{"name": "default", "template": "from tokenizer_config"}]})
    )
    assert read_chat_template(tmp_path) == "from tokenizer_config"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from json"}))
    assert read_chat_template(tmp_path) == "from json"
    (tmp_path / "chat_template.jinja").write_text("from jinja")
    assert read_chat_template(tmp_path) == "from jinja"


@pytest.mark.parametrize(
    ("weights", "replicated", "world", "expected"),
    [
        (1000, 0, 2, 500),
        (1000, 300, 2, 300 + 350),  # embeddings whole on each rank, the rest halved
        (1000, 300, 4, 300 + 175),
        (1001, 0, 2, 501),  # rounded up: never under-reserve
        (1000, 1500, 2, 1000),  # an estimate above the total is capped
        (1000, 300, 1, 1000),
    ],
)
def test_a_tensor_parallel_rank_holds_the_replicated_weights_whole(
    weights: int, replicated: int, world: int, expected: int
) -> None:
    assert tensor_parallel_rank_bytes(weights, replicated, world) == expected


def test_replicated_weights_are_the_embeddings_once_when_tied() -> None:
    from types import SimpleNamespace

    tied = SimpleNamespace(vocab_size=1000, hidden_size=64, tie_word_embeddings=True)
    untied = SimpleNamespace(vocab_size=1000, hidden_size=64, tie_word_embeddings=False)
    assert replicated_weight_bytes(tied, 2) == 1000 * 64 * 2
    assert replicated_weight_bytes(untied, 2) == 2 * 1000 * 64 * 2
