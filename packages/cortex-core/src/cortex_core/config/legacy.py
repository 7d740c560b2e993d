"""Keys of the Rust system's config files, read with one warning each that names the replacement.

The seeds' example configs (and configs operators carry over from the Rust system) use keys
this implementation does not have or spells differently. Rather than refusing to start, the
loaders rewrite them first: a key with a replacement moves there, a key with nothing to
replace it is dropped, and each logs one warning that says what to write instead. Every
other unknown key is still an error (a typo must never empty a catalogue silently).

The translations are pure functions of the parsed TOML: they return the rewritten document
and the warnings, and the loaders log them.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

log = logging.getLogger("cortex_core.config")

# The Rust neuron's only harness was candle; here the in-process harness is torch.
RUST_HARNESS = "candle"
HARNESS = "torch"


def _harness_warning(where: str) -> str:
    return (
        f'{where}: harness = "candle" is the Rust neuron\'s engine; it is read as harness = "torch" '
        '(write "torch", or leave the key out)'
    )


def translate_gateway(data: dict[str, Any], source: str) -> tuple[dict[str, Any], list[str]]:
    """cortex.toml: `[eviction] defrag_after_cycles` and `[upstream]` have no counterpart here."""
    data = copy.deepcopy(data)
    warnings: list[str] = []
    eviction = data.get("eviction")
    if isinstance(eviction, dict) and "defrag_after_cycles" in eviction:
        del eviction["defrag_after_cycles"]
        warnings.append(
            f"{source}: `[eviction] defrag_after_cycles` is a Rust gateway key and is ignored: placement "
            "uses the free memory each neuron measures (GET /health), so there is no fragmentation "
            "counter to tune; remove the key"
        )
    if "upstream" in data:
        del data["upstream"]
        warnings.append(
            f"{source}: `[upstream]` (the Rust gateway's usage reporting) is ignored; usage is exported "
            "as Prometheus metrics on `[gateway] metrics_listen` (cortex_prompt_tokens_total, "
            "cortex_completion_tokens_total); remove the table"
        )
    return data, warnings


def translate_catalogue(data: dict[str, Any], source: str) -> tuple[dict[str, Any], list[str]]:
    """models.toml: `harness = "candle"` → torch; `limit` and `cost` per model are ignored."""
    data = copy.deepcopy(data)
    warnings: list[str] = []
    models = data.get("models")
    if not isinstance(models, list):
        return data, warnings
    candle = [i for i, m in enumerate(models) if isinstance(m, dict) and m.get("harness") == RUST_HARNESS]
    for index in candle:
        models[index]["harness"] = HARNESS
    if candle:
        where = ", ".join(f"models[{i}]" for i in candle)
        warnings.append(_harness_warning(f"{source}: {where}"))
    for key, why in (
        ("limit", "each neuron reports a loaded model's context and output limits itself"),
        ("cost", "prices are not served by this gateway"),
    ):
        having = [i for i, m in enumerate(models) if isinstance(m, dict) and key in m]
        for index in having:
            del models[index][key]
        if having:
            warnings.append(
                f"{source}: `{key}` in {', '.join(f'models[{i}]' for i in having)} is a Rust catalogue "
                f"key and is ignored ({why}); remove it"
            )
    return data, warnings


def translate_neuron(data: dict[str, Any], source: str) -> tuple[dict[str, Any], list[str]]:
    """neuron.toml: `[[harnesses]]` and `[harness.candle]` → the top-level keys of this neuron."""
    data = copy.deepcopy(data)
    warnings: list[str] = []
    if "harnesses" in data:
        del data["harnesses"]
        warnings.append(
            f"{source}: `[[harnesses]]` is a Rust neuron key and is ignored: the torch harness is built "
            "in and always on; remove the table"
        )
    harness = data.pop("harness", None)
    if isinstance(harness, dict):
        candle = harness.get(RUST_HARNESS)
        if isinstance(candle, dict):
            moved = []
            for old, new in (
                ("hf_cache", "cache_dir"),
                ("default_source", "default_source"),
                ("sources", "sources"),
            ):
                if old in candle and new not in data:
                    data[new] = candle.pop(old)
                    moved.append(f"`{old}` → `{new}`")
            admission = candle.pop("admission", None)
            if admission is not None:
                warnings.append(
                    f"{source}: `[harness.candle.admission]` is ignored; the engine's admission is set "
                    "by `[engine] max_batch_size` and `max_queue_depth`"
                )
            detail = f" ({', '.join(moved)})" if moved else ""
            warnings.append(
                f"{source}: `[harness.candle]` is the Rust neuron's section; its keys are read as "
                f"top-level keys{detail}; move them out of the section"
            )
            if candle:
                # Anything else in it is unknown here too: keep it, so the error names it.
                data.setdefault("harness", {})[RUST_HARNESS] = candle
        other = {name: value for name, value in harness.items() if name != RUST_HARNESS}
        if other:
            data.setdefault("harness", {}).update(other)
    elif harness is not None:
        data["harness"] = harness
    defaults = data.get("default_models")
    if isinstance(defaults, list):
        candle_defaults = [
            i for i, m in enumerate(defaults) if isinstance(m, dict) and m.get("harness") == RUST_HARNESS
        ]
        for index in candle_defaults:
            defaults[index]["harness"] = HARNESS
        if candle_defaults:
            where = ", ".join(f"default_models[{i}]" for i in candle_defaults)
            warnings.append(_harness_warning(f"{source}: {where}"))
    return data, warnings


def warn(warnings: list[str]) -> None:
    for message in warnings:
        log.warning("%s", message)
