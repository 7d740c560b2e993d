"""The seeds' example configs and Rust-style configs load, with one warning per old key."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from support.seed_configs import RUST_MODELS_TOML, RUST_NEURON_TOML, SEED_CORTEX_TOML

from cortex_core.config import ConfigError, load_catalogue, load_gateway_config, load_neuron_config
from cortex_core.config.legacy import translate_catalogue, translate_gateway, translate_neuron


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "cortex_core.config" and r.levelno == logging.WARNING
    ]


def test_the_seed_readme_cortex_toml_starts_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = load_gateway_config(write(tmp_path, "cortex.toml", SEED_CORTEX_TOML), env={})
    assert [n.name for n in config.neurons] == ["beast", "benjy"]
    assert config.eviction.strategy == "lru"
    assert config.gateway.listen == "0.0.0.0:31313"
    [warning] = warnings_of(caplog)
    assert "defrag_after_cycles" in warning and "GET /health" in warning and "remove the key" in warning


def test_a_rust_models_toml_reads_candle_as_torch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    catalogue = load_catalogue(write(tmp_path, "models.toml", RUST_MODELS_TOML))
    small, big = catalogue.profiles
    assert (small.id, small.harness, small.quant, small.pinned_on) == (
        "Qwen/Qwen3-8B",
        "torch",
        "q6k",
        ["beast"],
    )
    assert (big.harness, big.min_devices, big.load_id) == ("torch", 2, "helexa:Qwen/Qwen3.6-27B")
    assert catalogue.resolve_alias("qwen") == "Qwen/Qwen3-8B"
    warnings = warnings_of(caplog)
    assert len(warnings) == 3  # harness (both models in one), limit, cost
    assert 'harness = "candle"' in warnings[0] and "models[0], models[1]" in warnings[0]
    assert 'write "torch"' in warnings[0]
    assert "`limit`" in warnings[1] and "neuron reports" in warnings[1]
    assert "`cost`" in warnings[2]


def test_a_rust_neuron_toml_moves_the_candle_section_to_top_level_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = load_neuron_config(write(tmp_path, "neuron.toml", RUST_NEURON_TOML), env={})
    assert config.port == 13131
    assert config.cache_dir == "/var/lib/neuron/hf"
    assert config.default_source == "huggingface"
    assert config.sources["helexa"].endpoint == "https://models.helexa.example"
    assert config.sources["helexa"].auth_env == "HELEXA_TOKEN"
    [default] = config.default_models
    assert (default.model_id, default.harness, default.quant) == ("Qwen/Qwen3-0.6B-GGUF", "torch", "Q4_K_M")
    warnings = warnings_of(caplog)
    assert any("[[harnesses]]" in w and "built in" in w for w in warnings)
    assert any("[harness.candle.admission]" in w and "max_batch_size" in w for w in warnings)
    assert any("`hf_cache` → `cache_dir`" in w for w in warnings)
    assert any('harness = "candle"' in w and "default_models[0]" in w for w in warnings)
    assert len(warnings) == 4


def test_other_unknown_keys_are_still_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_gateway_config(
            write(tmp_path, "cortex.toml", SEED_CORTEX_TOML + "\n[evictoin]\nstrategy = 'lru'\n"), env={}
        )
    assert "unknown field `evictoin`" in str(caught.value)
    text = RUST_NEURON_TOML.replace("hf_cache =", "hf_cahce =")
    with pytest.raises(ConfigError) as caught:
        load_neuron_config(write(tmp_path, "neuron.toml", text), env={})
    assert "harness" in str(caught.value)


@pytest.mark.parametrize(
    ("translate", "document"),
    [
        (translate_gateway, {"gateway": {"listen": "0.0.0.0:1"}}),
        (translate_catalogue, {"models": [{"id": "a/b", "harness": "torch"}]}),
        (translate_neuron, {"port": 1, "default_models": [{"model_id": "a/b", "harness": "torch"}]}),
    ],
)
def test_a_current_config_is_left_as_it_is_without_warnings(
    translate: object, document: dict[str, object]
) -> None:
    translated, warnings = translate(document, "x.toml")  # type: ignore[operator]
    assert (translated, warnings) == (document, [])
