"""The cortex command: serve the gateway, show fleet status, load and unload models."""

__version__ = "0.1.0"
