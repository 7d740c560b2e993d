"""Config loading: TOML, environment overrides, and an error naming file, key and problem for each bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from cortex_core.config import (
    ConfigError,
    load_catalogue,
    load_gateway_config,
    load_neuron_config,
    parse_catalogue,
)

GATEWAY_TOML = """
models_config = "models.toml"

[gateway]
listen = "0.0.0.0:31313"
metrics_listen = "0.0.0.0:31314"

[eviction]
strategy = "lru"

[[neurons]]
name = "beast"
endpoint = "http://beast.internal:13131"

[[neurons]]
name = "benjy"
endpoint = "http://benjy.internal:13131"
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_gateway_config_reads_file_and_resolves_models_config_next_to_it(tmp_path: Path) -> None:
    config = load_gateway_config(write(tmp_path, "cortex.toml", GATEWAY_TOML), env={})
    assert config.gateway.listen == "0.0.0.0:31313"
    assert [n.name for n in config.neurons] == ["beast", "benjy"]
    assert config.models_config == str(tmp_path / "models.toml")


def test_gateway_defaults_without_a_file() -> None:
    config = load_gateway_config(None, env={})
    assert config.gateway.listen == "127.0.0.1:31313"
    assert config.gateway.metrics_listen == "127.0.0.1:31314"
    assert config.neurons == []
    assert config.models_config is None


@pytest.mark.parametrize(
    ("env", "check"),
    [
        ({"CORTEX_GATEWAY__LISTEN": "127.0.0.1:9999"}, lambda c: c.gateway.listen == "127.0.0.1:9999"),
        ({"CORTEX_POLLER__INTERVAL_SECS": "0.5"}, lambda c: c.poller.interval_secs == 0.5),
        ({"CORTEX_ROUTER__MAX_WAITING_PER_MODEL": "3"}, lambda c: c.router.max_waiting_per_model == 3),
        ({"CORTEX_EVICTION__STRATEGY": "priority"}, lambda c: c.eviction.strategy == "priority"),
        (
            {"cortex_gateway__listen": "x:1"},
            lambda c: c.gateway.listen == "0.0.0.0:31313",
        ),  # prefix is case-sensitive
        (
            {"CORTEX_SOMETHING_ELSE": "1"},
            lambda c: c.gateway.listen == "0.0.0.0:31313",
        ),  # unknown keys are not ours
        (
            {"CORTEX_NEURONS": '[{name = "n1", endpoint = "http://n1:13131"}]'},
            lambda c: [n.name for n in c.neurons] == ["n1"],
        ),
    ],
)
def test_environment_overrides_the_file(tmp_path: Path, env: dict[str, str], check: object) -> None:
    config = load_gateway_config(write(tmp_path, "cortex.toml", GATEWAY_TOML), env=env)
    assert callable(check) and check(config)


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("[gateway]\nlisten = 5\n", "gateway.listen", "expected `str`, got `int`"),
        ("[gateway]\nlisen = 'x'\n", "gateway", "unknown field `lisen`"),
        ("[gateway]\nlisten = '0.0.0.0'\n", "gateway.listen", "expected 'host:port'"),
        ("[gateway]\nmetrics_listen = 'h:99999'\n", "gateway.metrics_listen", "expected 'host:port'"),
        ("[[neurons]]\nname = 'a'\n", "neurons[0]", "missing required field `endpoint`"),
        ("[[neurons]]\nname = 'a'\nendpoint = 'beast:13131'\n", "neurons[0].endpoint", "http(s) URL"),
        (
            "[[neurons]]\nname='a'\nendpoint='http://a:1'\n[[neurons]]\nname='a'\nendpoint='http://b:1'\n",
            "neurons[1].name",
            "duplicate neuron name",
        ),
        ("[eviction]\nstrategy = 'fifo'\n", "eviction.strategy", "expected one of"),
        ("[poller]\nunhealthy_after = 0\n", "poller.unhealthy_after", "at least 1"),
        ("[poller]\ninterval_secs = 'soon'\n", "poller.interval_secs", "expected `float`, got `str`"),
    ],
)
def test_gateway_config_errors_name_file_key_and_problem(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    path = write(tmp_path, "cortex.toml", text)
    with pytest.raises(ConfigError) as info:
        load_gateway_config(path, env={})
    assert info.value.source == str(path)
    assert info.value.key == key
    assert problem in str(info.value)
    assert str(path) in str(info.value)


def test_unparseable_and_missing_files_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_gateway_config(write(tmp_path, "cortex.toml", "[gateway\n"), env={})
    with pytest.raises(ConfigError, match="file not found"):
        load_gateway_config(tmp_path / "absent.toml", env={})


def test_env_override_with_a_wrong_type_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_gateway_config(None, env={"CORTEX_POLLER__TIMEOUT_SECS": "fast"})
    assert info.value.key == "poller.timeout_secs"


MODELS_TOML = """
[[models]]
id = "Qwen/Qwen3-8B"
vram_mb = 18000
capabilities = ["text"]

[[models]]
id = "Qwen/Qwen3.6-27B"
quant = "q6k"
min_devices = 2
min_device_vram_mb = 24000
pinned_on = ["beast"]
source = "helexa"

[[models]]
id = "HuggingFaceTB/SmolLM2-135M-Instruct"
residency_priority = 10
source = ""

[aliases]
"qwen-small" = "Qwen/Qwen3-8B"
"""


def test_catalogue_profiles_priorities_and_aliases(tmp_path: Path) -> None:
    catalogue = load_catalogue(write(tmp_path, "models.toml", MODELS_TOML))
    assert len(catalogue) == 3
    big = catalogue.get("Qwen/Qwen3.6-27B")
    assert big is not None and big.min_devices == 2 and big.priority == 1000
    assert big.load_id == "helexa:Qwen/Qwen3.6-27B"
    small = catalogue.get("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert small is not None and small.priority == 10 and small.source is None
    assert small.harness == "torch"
    assert catalogue.priority("Qwen/Qwen3-8B") == 100
    assert catalogue.priority("not/listed") == 100
    assert catalogue.resolve_alias("qwen-small") == "Qwen/Qwen3-8B"
    assert catalogue.resolve_alias("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"


def test_no_catalogue_configured_is_empty_but_a_missing_file_is_an_error(tmp_path: Path) -> None:
    assert len(load_catalogue(None)) == 0
    with pytest.raises(ConfigError, match="file not found"):
        load_catalogue(tmp_path / "models.toml")


@pytest.mark.parametrize(
    ("data", "key", "problem"),
    [
        ({"models": [{"id": "a/b", "vram_mb": "lots"}]}, "models[0].vram_mb", "expected `int | null`"),
        ({"models": [{"vram_mb": 1}]}, "models[0]", "missing required field `id`"),
        ({"models": [{"id": "a/b", "pinned": True}]}, "models[0]", "unknown field `pinned`"),
        ({"models": [{"id": "nameonly"}]}, "models[0].id", "like 'org/name'"),
        ({"models": [{"id": "a/b"}, {"id": "a/b"}]}, "models[1].id", "duplicate model id"),
        ({"models": [{"id": "a/b", "min_devices": 0}]}, "models[0].min_devices", "at least 1"),
        ({"models": [{"id": "a/b"}], "aliases": {"a/b": "a/b"}}, "aliases.a/b", "shadows"),
        ({"models": [], "aliases": {"x": "y", "y": "z"}}, "aliases.x", "do not chain"),
        ({"model": []}, None, "unknown field `model`"),
    ],
)
def test_catalogue_errors(data: dict[str, object], key: str | None, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_catalogue(data, source="models.toml")
    assert info.value.key == key
    assert problem in str(info.value)


NEURON_TOML = """
port = 13131
cache_dir = "cache"

[sources.helexa]
endpoint = "https://models.helexa.internal"
auth_env = "HELEXA_TOKEN"
cache_dir = "helexa-cache"

[[default_models]]
model_id = "Qwen/Qwen3-8B"

[[default_models]]
model_id = "helexa:Qwen/Qwen3.6-27B"
quant = "q6k"
tensor_parallel = 2
devices = [0, 1]

[engine]
max_batch_size = 4
"""


def test_neuron_config(tmp_path: Path) -> None:
    config = load_neuron_config(write(tmp_path, "neuron.toml", NEURON_TOML), env={})
    assert config.port == 13131
    assert config.cache_dir == str(tmp_path / "cache")
    assert config.sources["helexa"].cache_dir == str(tmp_path / "helexa-cache")
    assert config.sources["helexa"].auth_env == "HELEXA_TOKEN"
    assert [m.model_id for m in config.default_models] == ["Qwen/Qwen3-8B", "helexa:Qwen/Qwen3.6-27B"]
    assert config.default_models[1].devices == [0, 1]
    assert config.default_models[0].harness == "torch"
    assert config.engine.max_batch_size == 4


def test_neuron_env_overrides_and_runtime_knobs_are_ignored(tmp_path: Path) -> None:
    env = {"NEURON_PORT": "13132", "NEURON_ENGINE__MAX_BATCH_SIZE": "2", "NEURON_MAX_PROMPT_TOKENS": "99"}
    config = load_neuron_config(write(tmp_path, "neuron.toml", NEURON_TOML), env=env)
    assert config.port == 13132
    assert config.engine.max_batch_size == 2


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("port = 'high'\n", "port", "expected `int`, got `str`"),
        ("port = 70000\n", "port", "TCP port"),
        ("[[default_models]]\nharness = 'torch'\n", "default_models[0]", "missing required field `model_id`"),
        ("[sources.x]\nauth_env = 'T'\n", "sources.x", "missing required field `endpoint`"),
        ("[engine]\nmax_batch_size = 0\n", "engine.max_batch_size", "at least 1"),
        ("hf_cache = '/x'\n", None, "unknown field `hf_cache`"),
    ],
)
def test_neuron_config_errors(tmp_path: Path, text: str, key: str | None, problem: str) -> None:
    path = write(tmp_path, "neuron.toml", text)
    with pytest.raises(ConfigError) as info:
        load_neuron_config(path, env={})
    assert info.value.key == key
    assert problem in str(info.value)


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("[vision]\nfetch_urls = true\n", "vision.allowed_hosts", "needs at least one host"),
        ("[vision]\nmax_pixels = 0\n", "vision.max_pixels", "must be positive"),
        ("[vision]\nmax_image_bytes = -1\n", "vision.max_image_bytes", "must be positive"),
        ("[vision]\nmax_redirects = -1\n", "vision.max_redirects", "cannot be negative"),
    ],
)
def test_vision_config_errors_name_the_key(tmp_path: Path, text: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_neuron_config(write(tmp_path, "neuron.toml", text), env={})
    assert (info.value.key, problem in str(info.value)) == (key, True)


def test_vision_defaults_fetch_no_urls(tmp_path: Path) -> None:
    vision = load_neuron_config(None, env={}).vision
    assert (vision.fetch_urls, vision.allowed_hosts, vision.max_pixels) == (False, [], 1 << 20)
    allowed = load_neuron_config(
        write(tmp_path, "neuron.toml", '[vision]\nfetch_urls = true\nallowed_hosts = ["images.example"]\n'),
        env={},
    ).vision
    assert (allowed.fetch_urls, allowed.allowed_hosts) == (True, ["images.example"])
