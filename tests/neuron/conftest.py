"""Fixtures the neuron's engine tests share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.engine_harness import load_model

from neuron.device import DeviceWorker


@pytest.fixture(scope="module")
def worker(request: pytest.FixtureRequest) -> Iterator[DeviceWorker]:
    """One owner thread per test module, as a device has in the daemon."""
    w = DeviceWorker(f"test-{request.module.__name__}")
    yield w
    w.close()


@pytest.fixture(scope="module")
def tiny_qwen3_reference(tiny_qwen3: Path) -> tuple[Any, Any]:
    """tiny_qwen3 as transformers loads it (model, tokenizer): what served answers are checked against."""
    return load_model(tiny_qwen3)
