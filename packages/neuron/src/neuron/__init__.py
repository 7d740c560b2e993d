"""neuron: the per-GPU-host daemon that discovers devices, loads models and runs inference with torch."""

__version__ = "0.1.0"
