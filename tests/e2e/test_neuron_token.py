"""The fleet token: a neuron with `token_env` refuses calls without it; the gateway with it works.

The real neuron app (real manager and engine, a tiny random Qwen3) and the real gateway app
(aiohttp neuron client and proxy) are each served by hypercorn on loopback.
"""

from __future__ import annotations

from pathlib import Path

import httpx2
import msgspec
import pytest
from support.fake_upstream import on_hypercorn
from support.local_models import neuron_config

from cortex_core.config.catalogue import ModelCatalogue, ModelProfile
from cortex_core.config.gateway import GatewayConfig
from cortex_core.config.loader import ConfigError
from cortex_gateway.app import create_app as create_gateway
from neuron.app import create_app as create_neuron
from neuron.discovery import HostProbe

pytestmark = pytest.mark.slow

TOKEN_ENV = "CORTEX_TEST_FLEET_TOKEN"
TOKEN = "t0k3n-for-the-fleet-only-7f1d"


async def test_the_neuron_requires_the_token_and_the_gateway_sends_it(
    tiny_qwen3: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    model = str(tiny_qwen3)
    neuron = create_neuron(
        neuron_config(token_env=TOKEN_ENV),
        probe=HostProbe(None, cuda_unavailable_reason="test host: CPU only"),
        activate_defaults=False,
    )
    chat = {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}
    async with (
        on_hypercorn(neuron) as neuron_url,
        httpx2.AsyncClient(base_url=neuron_url, timeout=60) as direct,
    ):
        bearer = {"authorization": f"Bearer {TOKEN}"}
        refused_load = await direct.post("/models/load", json={"model_id": model})
        refused_chat = await direct.post("/v1/chat/completions", json=chat)
        wrong = await direct.post(
            "/models/load", json={"model_id": model}, headers={"authorization": "Bearer no"}
        )
        refused_models = await direct.get("/models")
        assert [r.status_code for r in (refused_load, refused_chat, wrong, refused_models)] == [401] * 4
        assert refused_load.json()["error"]["code"] == "invalid_neuron_token"
        assert TOKEN not in refused_load.text
        # Probes and scrapes stay open.
        assert (await direct.get("/health")).status_code == 200
        assert (await direct.get("/metrics")).status_code == 200

        config = msgspec.convert(
            {
                "neurons": [{"name": "n", "endpoint": neuron_url}],
                "auth": {"neuron_token_env": TOKEN_ENV},
            },
            GatewayConfig,
        )
        gateway = create_gateway(config, ModelCatalogue([ModelProfile(id=model)], {}), run_poller=False)
        async with (
            on_hypercorn(gateway) as gateway_url,
            httpx2.AsyncClient(base_url=gateway_url, timeout=120) as http,
        ):
            # Loading through the gateway: the poll, the load and the endpoint all carry the token.
            await gateway.state.poller.poll_once()
            loaded = await http.post("/admin/models/load", json={"model": model})
            assert loaded.status_code == 200, loaded.text
            answered = await http.post("/v1/chat/completions", json=chat)
        assert answered.status_code == 200, answered.text
        assert answered.json()["usage"]["completion_tokens"] >= 1
        assert (await direct.get("/models", headers=bearer)).json()[0]["id"] == model


def test_a_token_variable_that_is_named_but_unset_stops_startup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    probe = HostProbe(None, cuda_unavailable_reason="test host: CPU only")
    with pytest.raises(ConfigError, match=TOKEN_ENV):
        create_neuron(neuron_config(token_env=TOKEN_ENV), probe=probe, activate_defaults=False)
    config = msgspec.convert({"auth": {"neuron_token_env": TOKEN_ENV}}, GatewayConfig)
    with pytest.raises(ConfigError, match=TOKEN_ENV):
        create_gateway(config, ModelCatalogue([], {}), run_poller=False)
