"""`serve_gateway`: both listeners come up on loopback, answer, and stop on the trigger."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import aiohttp
import httpx2
import msgspec
import pytest
from support.fake_neuron import FakeNeuron
from support.fake_upstream import on_hypercorn

from cortex_core.config.catalogue import ModelCatalogue, ModelProfile
from cortex_core.config.gateway import GatewayConfig
from cortex_gateway.serve import serve_gateway


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def get_until_up(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    for _ in range(200):
        try:
            async with session.get(url) as response:
                return response.status, await response.read()
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.02)
    raise AssertionError(f"{url} never came up")


async def test_serve_gateway_runs_api_and_metrics_and_stops_on_trigger() -> None:
    neuron = FakeNeuron("a", devices_mb=[24_000])
    neuron.preload("org/small", 6_000)
    api, metrics = free_port(), free_port()
    async with on_hypercorn(neuron.app) as neuron_url:  # type: ignore[arg-type]
        config = msgspec.convert(
            {
                "gateway": {"listen": f"127.0.0.1:{api}", "metrics_listen": f"127.0.0.1:{metrics}"},
                "neurons": [{"name": "a", "endpoint": neuron_url}],
                "poller": {"interval_secs": 0.05},
            },
            GatewayConfig,
        )
        stop = asyncio.Event()
        server = asyncio.create_task(
            serve_gateway(
                config, ModelCatalogue([ModelProfile(id="org/small")], {}), shutdown_trigger=stop.wait
            )
        )
        async with aiohttp.ClientSession() as session:
            status, _ = await get_until_up(session, f"http://127.0.0.1:{api}/livez")
            assert status == 200
            for _ in range(200):  # the real poller, on its own schedule
                status, _ = await get_until_up(session, f"http://127.0.0.1:{api}/readyz")
                if status == 200:
                    break
                await asyncio.sleep(0.02)
            assert status == 200
            status, body = await get_until_up(session, f"http://127.0.0.1:{api}/v1/models")
            assert status == 200 and b'"org/small"' in body and b'"loaded":true' in body
            status, body = await get_until_up(session, f"http://127.0.0.1:{metrics}/metrics")
            assert status == 200 and b"# TYPE" in body
        stop.set()
        await asyncio.wait_for(server, timeout=10)
    with socket.socket() as probe:  # the port is free again
        probe.bind(("127.0.0.1", api))


async def test_the_gateway_starts_on_the_seed_cortex_toml_and_a_rust_models_toml(tmp_path: Path) -> None:
    from support.seed_configs import RUST_MODELS_TOML, SEED_CORTEX_TOML

    from cortex_core.config import load_catalogue, load_gateway_config
    from cortex_gateway.app import create_app

    (tmp_path / "cortex.toml").write_text(SEED_CORTEX_TOML, encoding="utf-8")
    (tmp_path / "models.toml").write_text(RUST_MODELS_TOML, encoding="utf-8")
    config = load_gateway_config(tmp_path / "cortex.toml", env={})
    catalogue = load_catalogue(tmp_path / "models.toml")
    app = create_app(config, catalogue, run_poller=False)
    async with app.router.lifespan_context(app):
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://gateway") as http:
            listed = (await http.get("/v1/models")).json()["data"]
    assert {entry["id"] for entry in listed} >= {"Qwen/Qwen3-8B", "Qwen/Qwen3.6-27B", "qwen"}
    assert [n.name for n in app.state.fleet.snapshot().nodes] == ["beast", "benjy"]


async def test_sighup_reloads_the_keys_file_of_a_serving_gateway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cortex_core.keys import KeysFile, new_key, write_keys
    from cortex_gateway.app import create_app
    from cortex_gateway.auth import KeyStore

    keys_file = tmp_path / "keys.json"
    first, first_secret = new_key("first")
    write_keys(keys_file, KeysFile(keys=[first]))
    reloaded = asyncio.Event()
    reload = KeyStore.reload

    def observed(store: KeyStore) -> bool:
        done = reload(store)
        reloaded.set()
        return done

    monkeypatch.setattr(KeyStore, "reload", observed)
    api, metrics = free_port(), free_port()
    config = msgspec.convert(
        {
            "gateway": {"listen": f"127.0.0.1:{api}", "metrics_listen": f"127.0.0.1:{metrics}"},
            "auth": {"keys_file": str(keys_file)},
        },
        GatewayConfig,
    )
    app = create_app(config, ModelCatalogue([], {}), run_poller=False)
    stop = asyncio.Event()
    server = asyncio.create_task(
        serve_gateway(config, ModelCatalogue([], {}), shutdown_trigger=stop.wait, app=app)
    )
    async with aiohttp.ClientSession() as session:
        assert (await get_until_up(session, f"http://127.0.0.1:{api}/livez"))[0] == 200
        second, second_secret = new_key("second")
        write_keys(keys_file, KeysFile(keys=[first, second]))
        # Never send SIGHUP unhandled: its default action would end the test run itself.
        assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        os.kill(os.getpid(), signal.SIGHUP)
        await asyncio.wait_for(reloaded.wait(), 10)
        async with session.get(
            f"http://127.0.0.1:{api}/v1/models", headers={"authorization": f"Bearer {second_secret}"}
        ) as response:
            assert response.status == 200
        async with session.get(
            f"http://127.0.0.1:{api}/v1/models", headers={"x-api-key": first_secret}
        ) as response:
            assert response.status == 200
    stop.set()
    await asyncio.wait_for(server, timeout=10)
