"""Neuron configs for tests whose models live in pytest's temporary folders."""

from __future__ import annotations

import tempfile
from typing import Any

from cortex_core.config.neuron import NeuronConfig

# A neuron loads local folders only from its configured roots (model_roots in neuron.toml);
# the tests build their tiny models under the system's temporary directory.
TEST_MODEL_ROOTS = [tempfile.gettempdir()]


def neuron_config(**fields: Any) -> NeuronConfig:
    """NeuronConfig(**fields), allowed to load models from the temporary directory."""
    return NeuronConfig(**{"model_roots": TEST_MODEL_ROOTS, **fields})
