"""Session-wide fixtures: tiny checkpoints are built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Never touch the network: a hub miss then fails in seconds instead of retrying for 28 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from support.tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from support.tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen3_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from support.tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen3-moe"), "qwen3_moe")


@pytest.fixture(scope="session", params=["qwen3_5", "qwen3_5_moe", "qwen3_next"])
def tiny_hybrid(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny Gated DeltaNet + full attention checkpoints, one per hybrid family."""
    from support.tiny_models import build_tiny_hybrid

    return build_tiny_hybrid(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)


@pytest.fixture(scope="session")
def tiny_qwen3_5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3.5 checkpoint (hybrid text model inside a vision-language one)."""
    from support.tiny_models import build_tiny_hybrid

    return build_tiny_hybrid(tmp_path_factory.mktemp("tiny-qwen3_5-served"), "qwen3_5")


@pytest.fixture(scope="session", params=["qwen3_5", "qwen3_vl", "qwen2_5_vl"])
def tiny_vision(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny vision-language checkpoints (tokenizer with the vision tokens, image processor
    config, a template that places images), one per family the neuron serves images for."""
    from support.tiny_models import build_tiny_vision

    return build_tiny_vision(tmp_path_factory.mktemp(f"tiny-vision-{request.param}"), request.param)


@pytest.fixture(scope="session")
def tiny_qwen3_5_vision(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen3.5 vision checkpoint the served (HTTP and SDK) tests load from a folder."""
    from support.tiny_models import build_tiny_vision

    return build_tiny_vision(tmp_path_factory.mktemp("tiny-qwen3_5-vision"), "qwen3_5")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a plain bf16 HF folder (toolchain.md §3a).

    Converted once per machine into the cortex cache ($CORTEX_CACHE_DIR or ~/.cache/cortex;
    ~30 s the first time, then instant); the `cortex serve` default model is the same folder.
    """
    from neuron.embedded import ensure_embedded_model

    return ensure_embedded_model()
