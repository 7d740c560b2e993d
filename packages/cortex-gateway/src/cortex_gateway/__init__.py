"""The cortex gateway: one OpenAI + Anthropic compatible API in front of a fleet of neuron daemons."""

__version__ = "0.1.0"
