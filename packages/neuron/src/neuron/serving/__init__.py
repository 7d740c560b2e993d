"""The neuron's OpenAI serving layer: templates, detokenisation, reasoning and tool parsing,
and the /v1 inference routes on top of the engine."""

from neuron.serving.routes import inference_routes

__all__ = ["inference_routes"]
