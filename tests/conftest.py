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


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a plain bf16 HF folder (toolchain.md §3a).

    Converted once per machine into the cortex cache ($CORTEX_CACHE_DIR or ~/.cache/cortex;
    ~30 s the first time, then instant); the `cortex serve` default model is the same folder.
    """
    from neuron.embedded import ensure_embedded_model

    return ensure_embedded_model()
