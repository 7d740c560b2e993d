"""`models.toml`: which models the fleet may serve, where, and how they are protected."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from cortex_core.config.legacy import translate_catalogue, warn
from cortex_core.config.loader import ConfigError, convert, read_toml

DEFAULT_PRIORITY = 100
# A model pinned to nodes and given no explicit priority is effectively never evicted by
# peers of default priority (the reference's legacy pin immunity).
PINNED_PRIORITY = 1000


class ModelProfile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    id: str
    harness: str = "torch"
    quant: str | None = None
    vram_mb: int | None = None
    min_devices: int = 1
    min_device_vram_mb: int | None = None
    pinned_on: list[str] = msgspec.field(default_factory=list)
    residency_priority: int | None = None
    source: str | None = None
    capabilities: list[str] = msgspec.field(default_factory=list)
    # Lower an oversized max_tokens to what the context leaves instead of refusing it
    # (opt-in: a client that asked for more should normally hear so, docs/gateway.md).
    clamp_max_tokens: bool = False
    # This model's own conversation limits (default: gateway.max_messages / max_prompt_bytes).
    max_messages: int | None = None
    max_prompt_bytes: int | None = None

    @property
    def priority(self) -> int:
        if self.residency_priority is not None:
            return self.residency_priority
        return PINNED_PRIORITY if self.pinned_on else DEFAULT_PRIORITY

    @property
    def load_id(self) -> str:
        """The id sent to a neuron: `source:id` when an operator mirror is named."""
        return f"{self.source}:{self.id}" if self.source else self.id


class CatalogueFile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    models: list[ModelProfile] = msgspec.field(default_factory=list)
    aliases: dict[str, str] = msgspec.field(default_factory=dict)


class ModelCatalogue:
    """Profiles by id plus aliases; aliases resolve once and never chain."""

    def __init__(self, profiles: list[ModelProfile], aliases: dict[str, str]) -> None:
        self.profiles = list(profiles)
        self._by_id = {profile.id: profile for profile in profiles}
        self.aliases = dict(aliases)

    def get(self, model_id: str) -> ModelProfile | None:
        return self._by_id.get(model_id)

    def resolve_alias(self, requested: str) -> str:
        return self.aliases.get(requested, requested)

    def clamps_max_tokens(self, model_id: str) -> bool:
        profile = self._by_id.get(model_id)
        return profile is not None and profile.clamp_max_tokens

    def priority(self, model_id: str) -> int:
        """Unlisted residents get the default class, so they can never wedge a node."""
        profile = self._by_id.get(model_id)
        return profile.priority if profile else DEFAULT_PRIORITY

    def __len__(self) -> int:
        return len(self.profiles)


def parse_catalogue(data: dict[str, Any], *, source: str) -> ModelCatalogue:
    translated, warnings = translate_catalogue(data, source)
    warn(warnings)
    parsed = convert(translated, CatalogueFile, source=source)
    seen: set[str] = set()
    for index, profile in enumerate(parsed.models):
        key = f"models[{index}]"
        if not profile.id or "/" not in profile.id.strip("/"):
            raise ConfigError(source, f"expected a model id like 'org/name', got {profile.id!r}", f"{key}.id")
        if profile.id in seen:
            raise ConfigError(source, f"duplicate model id {profile.id!r}", f"{key}.id")
        seen.add(profile.id)
        if profile.min_devices < 1:
            raise ConfigError(source, "must be at least 1", f"{key}.min_devices")
        if profile.source == "":
            parsed.models[index] = msgspec.structs.replace(profile, source=None)
    for alias, target in parsed.aliases.items():
        if alias in seen:
            raise ConfigError(
                source, f"alias {alias!r} shadows a model id of the same name", f"aliases.{alias}"
            )
        if target in parsed.aliases:
            raise ConfigError(
                source, f"aliases do not chain: {target!r} is itself an alias", f"aliases.{alias}"
            )
    return ModelCatalogue(parsed.models, parsed.aliases)


def load_catalogue(path: Path | None) -> ModelCatalogue:
    """models.toml; None means no catalogue (the gateway serves only what is loaded)."""
    if path is None:
        return ModelCatalogue([], {})
    return parse_catalogue(read_toml(path), source=str(path))
