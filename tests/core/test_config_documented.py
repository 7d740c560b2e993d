"""Every key of the three config files appears in the README's configuration reference."""

from __future__ import annotations

import typing
from pathlib import Path

import msgspec
import pytest

from cortex_core.config.catalogue import CatalogueFile
from cortex_core.config.gateway import GatewayConfig
from cortex_core.config.neuron import NeuronConfig

README = Path(__file__).resolve().parents[2] / "README.md"


def keys(struct: type[msgspec.Struct], prefix: str = "") -> list[str]:
    """Dotted key paths, descending into nested sections (and list/dict entries of Structs)."""
    found = []
    hints = typing.get_type_hints(struct)
    for field in msgspec.structs.fields(struct):
        path = f"{prefix}{field.encode_name}"
        found.append(path)
        inner = [hints[field.name], *typing.get_args(hints[field.name])]
        for candidate in inner:
            for leaf in (candidate, *typing.get_args(candidate)):
                if isinstance(leaf, type) and issubclass(leaf, msgspec.Struct):
                    found.extend(keys(leaf, f"{path}."))
    return found


@pytest.mark.parametrize(
    "key",
    sorted(
        {
            *keys(GatewayConfig),
            *keys(CatalogueFile),
            *keys(NeuronConfig),
        }
    ),
)
def test_key_is_documented(key: str) -> None:
    # The reference names each key in backticks under its section (`[router] load_wait_secs`),
    # and sections as `[router]`, `[[neurons]]` or `[sources.<scheme>]`.
    leaf = key.rsplit(".", 1)[-1]
    text = README.read_text()
    forms = (f"`{leaf}`", f" {leaf}`", f", {leaf}`", f"[{leaf}]", f"[{leaf}.")
    assert any(form in text for form in forms), (
        f"config key {key!r} is not in README.md's configuration reference"
    )
