"""bench/device_kit.py: what travels to a GPU machine that reaches no package index."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_kit_pins_what_the_tests_import_and_leaves_the_gpu_build_alone() -> None:
    kit = load(ROOT / "bench" / "device_kit.py", "device_kit")
    pins = dict(pin.split("==") for pin in kit.third_party_pins(kit.rpm_build()))
    # The neuron's own dependencies, the gateway's, and the test tools, at this environment's versions.
    for name in ("msgspec", "llguidance", "minijinja", "transformers", "starlette", "hypercorn", "aiohttp"):
        assert pins[name] == importlib.metadata.version(name)
    for name in ("pytest", "pytest-asyncio", "openai", "anthropic"):
        assert pins[name] == importlib.metadata.version(name)
    # The machine's CUDA torch is the point; the large packages its image holds stay too.
    assert not [name for name in pins if re.match(r"torch|triton|nvidia-|cuda-|numpy$|pillow$|hf-xet$", name)]
    # Our own packages travel as wheels built from this tree, not as downloads.
    assert not {"cortex-core", "cortex-gateway", "cortex-cli", "neuron"} & pins.keys()
