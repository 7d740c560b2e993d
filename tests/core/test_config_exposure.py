"""Secure by default: no keys file means loopback only, unless anonymous access is explicit."""

from __future__ import annotations

import msgspec
import pytest

from cortex_core.config.gateway import GatewayConfig, check_exposure, is_loopback
from cortex_core.config.loader import ConfigError


@pytest.mark.parametrize(
    ("listen", "auth", "exposed"),
    [
        ("127.0.0.1:31313", {}, False),
        ("localhost:31313", {}, False),
        ("[::1]:31313", {}, False),
        ("0.0.0.0:31313", {"keys_file": "/etc/cortex/keys.json"}, False),
        ("10.0.0.5:31313", {"keys_file": "keys.json"}, False),
        ("0.0.0.0:31313", {"allow_anonymous": True}, True),
        ("gpu-gw.internal:31313", {"allow_anonymous": True}, True),
        ("0.0.0.0:31313", {}, None),  # refused
        ("[::]:31313", {}, None),
        ("10.0.0.5:31313", {}, None),
    ],
)
def test_exposure(listen: str, auth: dict[str, object], exposed: bool | None) -> None:
    config = msgspec.convert({"gateway": {"listen": listen}, "auth": auth}, GatewayConfig)
    if exposed is None:
        with pytest.raises(ConfigError, match="allow_anonymous"):
            check_exposure(config, "cortex.toml")
    else:
        assert check_exposure(config, "cortex.toml") is exposed


def test_is_loopback() -> None:
    assert [
        is_loopback(h) for h in ("127.0.0.1", "127.8.0.1", "::1", "localhost", "0.0.0.0", "::", "example")
    ] == [
        True,
        True,
        True,
        True,
        False,
        False,
        False,
    ]


async def test_serve_refuses_an_open_listener_and_warns_when_allowed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from cortex_core.config.catalogue import ModelCatalogue
    from cortex_gateway.serve import serve_gateway

    async def never() -> None:
        raise AssertionError("the gateway must not have started")

    refused = msgspec.convert({"gateway": {"listen": "0.0.0.0:1"}}, GatewayConfig)
    with pytest.raises(ConfigError, match="without API keys"):
        await serve_gateway(refused, ModelCatalogue([], {}), shutdown_trigger=never)
