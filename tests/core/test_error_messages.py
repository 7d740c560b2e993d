"""The exact messages users see for a config or a request body that does not fit its type.

The location comes from walking the schema (cortex_core.validation), the problem from
msgspec; these pin the whole sentence, so a msgspec upgrade that rewords its messages, or a
change to how the location is found, shows up here rather than in a user's terminal.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from cortex_core.config.gateway import load_gateway_config
from cortex_core.config.loader import ConfigError
from cortex_core.config.neuron import load_neuron_config
from cortex_core.errors import ApiError, decode_json_body
from cortex_core.openai.chat import ChatCompletionRequest
from cortex_core.validation import convert_check, dotted, json_path, locate_invalid


@pytest.mark.parametrize(
    ("load", "text", "message"),
    [
        (load_gateway_config, "[gateway]\nlisten = 5\n", "key `gateway.listen`: expected `str`, got `int`"),
        (
            load_gateway_config,
            "[gateway]\nlisen = 'x'\n",
            "key `gateway`: object contains unknown field `lisen`",
        ),
        (
            load_gateway_config,
            "[eviction]\nstrategy = 'fifo'\n",
            "key `eviction.strategy`: invalid enum value 'fifo'; expected one of 'lru', 'priority'",
        ),
        (
            load_gateway_config,
            "[[neurons]]\nname = 'a'\n",
            "key `neurons[0]`: object missing required field `endpoint`",
        ),
        # A dict entry is named by its key, which msgspec's own message leaves as `[...]`.
        (
            load_neuron_config,
            "[sources.x]\nauth_env = 'T'\n",
            "key `sources.x`: object missing required field `endpoint`",
        ),
        (
            load_neuron_config,
            "[sources.x]\nendpoint = 5\n",
            "key `sources.x.endpoint`: expected `str`, got `int`",
        ),
        (load_neuron_config, "hf_cache = '/x'\n", "Object contains unknown field `hf_cache`"),
    ],
)
def test_config_messages(tmp_path: Path, load: Callable[..., object], text: str, message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    assert str(info.value) == f"{path}: {message}"


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        (
            {"model": "m", "messages": [{"role": "robot", "content": "x"}]},
            "invalid request body: Invalid value 'robot' - at `$.messages[0].role`",
            "$.messages[0].role",
        ),
        (
            {"model": "m", "messages": [], "temperature": "hot"},
            "invalid request body: Expected `float | null`, got `str` - at `$.temperature`",
            "$.temperature",
        ),
        (
            {"messages": []},
            "invalid request body: Object missing required field `model`",
            None,
        ),
    ],
)
def test_request_body_messages(body: dict[str, Any], message: str, param: str | None) -> None:
    with pytest.raises(ApiError) as info:
        decode_json_body(msgspec.json.encode(body), ChatCompletionRequest)
    assert (info.value.message, info.value.param) == (message, param)


class Inner(msgspec.Struct):
    n: int


class Outer(msgspec.Struct):
    table: dict[str, Inner]
    rows: list[Inner] = []


def test_the_location_is_data_not_text() -> None:
    found = locate_invalid({"table": {"ok": {"n": 1}, "bad": {"n": "x"}}}, Outer, convert_check())
    assert found is not None
    assert found.path == ("table", "bad", "n")
    assert (dotted(found.path), json_path(found.path)) == ("table.bad.n", "$.table.bad.n")
    assert found.problem == "Expected `int`, got `str`"
    assert locate_invalid({"table": {}, "rows": [{"n": 2}]}, Outer, convert_check()) is None
    deep = locate_invalid({"table": {}, "rows": [{"n": 1}, {}]}, Outer, convert_check())
    assert deep is not None and dotted(deep.path) == "rows[1]"


def test_a_body_that_fails_validation_before_its_syntax_error_is_still_a_400() -> None:
    # msgspec validates while it parses, so it can refuse `model` before it reaches the
    # truncation; the body then has no location to give, but it is the client's error.
    with pytest.raises(ApiError) as info:
        decode_json_body(b'{"model": 5, "messages": [', ChatCompletionRequest)
    assert (info.value.status, info.value.param) == (400, None)
    assert info.value.message == "invalid request body: Expected `str`, got `int` - at `$.model`"
