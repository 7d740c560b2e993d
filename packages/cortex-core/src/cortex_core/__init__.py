"""Shared wire types, configuration, error envelopes and dialect translation for cortex."""

__version__ = "0.1.0"
