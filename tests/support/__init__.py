"""Shared test support: tiny model builders and process helpers."""
