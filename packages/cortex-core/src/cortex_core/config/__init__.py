"""Configuration files of cortex: cortex.toml, models.toml and neuron.toml."""

from cortex_core.config.catalogue import ModelCatalogue, ModelProfile, load_catalogue, parse_catalogue
from cortex_core.config.gateway import (
    GatewayConfig,
    HostPort,
    NeuronEndpoint,
    load_gateway_config,
    parse_listen,
)
from cortex_core.config.loader import ConfigError
from cortex_core.config.neuron import EngineConfig, NeuronConfig, SourceConfig, load_neuron_config

__all__ = [
    "ConfigError",
    "EngineConfig",
    "GatewayConfig",
    "HostPort",
    "ModelCatalogue",
    "ModelProfile",
    "NeuronConfig",
    "NeuronEndpoint",
    "SourceConfig",
    "load_catalogue",
    "load_gateway_config",
    "load_neuron_config",
    "parse_catalogue",
    "parse_listen",
]
