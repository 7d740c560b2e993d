"""Faults of real neuron processes, seen by the real gateway on loopback.

Each neuron here is `tests/support/fake_neuron_process.py`: a process of its own with the
neuron management API and a canned inference route, so a test can kill it, restart it or
stop it with SIGSTOP. The gateway is the real app served by hypercorn in the test process,
with its own poller running and the real aiohttp neuron client. Waiting for the gateway to
notice something is a poll of its admin API until a deadline (a hang guard, not a speed
check).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import msgspec
import pytest
from support.fake_upstream import on_hypercorn
from support.processes import Service, clean_env, free_port, start

from cortex_core.config.catalogue import ModelCatalogue, ModelProfile
from cortex_core.config.gateway import GatewayConfig
from cortex_gateway.app import create_app

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "support" / "fake_neuron_process.py"
CATALOGUE = ModelCatalogue(
    [ModelProfile(id="org/m", vram_mb=4_000), ModelProfile(id="org/cold", vram_mb=20_000)], {}
)
CHAT = {"model": "org/m", "messages": [{"role": "user", "content": "hi"}]}
DEADLINE_SECS = 60.0


@contextlib.contextmanager
def neuron_process(tmp_path: Path, name: str, port: int, *args: str) -> Iterator[Service]:
    """The fake neuron on `port`, once its /health answers; stopped when the block ends (a
    process the test killed already is simply reaped)."""
    command = [
        sys.executable,
        str(SCRIPT),
        "--port",
        str(port),
        "--size",
        "org/m=4000",
        "--size",
        "org/cold=20000",
        *args,
    ]
    service = start(name, command, tmp_path / f"{name}-{port}.log", clean_env())
    try:
        with httpx2.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            service.wait_for(lambda: client.get("/health").status_code == 200, "its /health", timeout=60)
        yield service
    finally:
        service.stop()


@contextlib.asynccontextmanager
async def gateway(ports: dict[str, int], **sections: dict[str, object]) -> AsyncIterator[httpx2.AsyncClient]:
    config = msgspec.convert(
        {
            "neurons": [
                {"name": name, "endpoint": f"http://127.0.0.1:{port}"} for name, port in ports.items()
            ],
            "poller": {"interval_secs": 0.2, "timeout_secs": 2.0, "unhealthy_after": 2},
            **sections,
        },
        GatewayConfig,
    )
    app = create_app(config, CATALOGUE)
    async with on_hypercorn(app) as url, httpx2.AsyncClient(base_url=url, timeout=30) as http:
        yield http


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_SECS
    while loop.time() < deadline:
        with contextlib.suppress(httpx2.TransportError):
            if await check():
                return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {DEADLINE_SECS:g} s: {what}")


async def model_status(http: httpx2.AsyncClient, node: str, model: str) -> str | None:
    fleet: dict[str, Any] = (await http.get("/admin/fleet")).json()
    for entry in fleet["nodes"]:
        if entry["name"] == node:
            for view in entry["models"]:
                if view["id"] == model:
                    return str(view["status"])
    return None


async def loaded_on(http: httpx2.AsyncClient, nodes: list[str], what: str) -> None:
    """Waits until the gateway's fleet report shows org/m loaded on each of `nodes`."""

    async def loaded() -> bool:
        return [await model_status(http, node, "org/m") for node in nodes] == ["loaded"] * len(nodes)

    await eventually(loaded, what)


def calls(port: int) -> dict[str, Any]:
    with httpx2.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        answer: dict[str, Any] = client.get("/calls").json()
        return answer


async def test_a_neuron_killed_and_restarted_is_relearned_and_served(tmp_path: Path) -> None:
    port = free_port()
    with neuron_process(tmp_path, "a", port, "--preload", "org/m") as first:
        async with gateway({"a": port}) as http:
            await loaded_on(http, ["a"], "the first poll")
            assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
            first.process.kill()
            first.process.wait()

            async def unhealthy() -> bool:
                return (await http.get("/health")).json()["status"] == "degraded"

            await eventually(unhealthy, "the gateway sees the neuron gone")
            down = await http.post("/v1/chat/completions", json=CHAT)
            assert down.status_code == 503 and "retry-after" in down.headers

            with neuron_process(tmp_path, "a", port):  # a fresh neuron: nothing loaded

                async def healthy() -> bool:
                    return (await http.get("/health")).json()["status"] == "ok"

                await eventually(healthy, "the gateway re-learns the restarted neuron")
                served = await http.post("/v1/chat/completions", json=CHAT)
                assert served.status_code == 200, served.text
                assert calls(port)["loads"] == ["org/m"]  # cold-loaded on the new process


async def test_a_poisoned_model_comes_back_by_itself(tmp_path: Path) -> None:
    port = free_port()
    with neuron_process(tmp_path, "a", port, "--preload", "org/m=poisoned"):
        async with gateway({"a": port}, router={"recovery_backoff_secs": 0.5}) as http:
            await loaded_on(http, ["a"], "the poisoned model is reloaded")
            assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
        seen = calls(port)
        assert (seen["unloads"], seen["loads"]) == (["org/m"], ["org/m"])


async def test_a_malformed_body_for_a_cold_model_causes_no_load(tmp_path: Path) -> None:
    port = free_port()
    with neuron_process(tmp_path, "a", port, "--preload", "org/m"):
        async with gateway({"a": port}, eviction={"min_residency_secs": 0}) as http:
            await loaded_on(http, ["a"], "the first poll")
            bad = {"model": "org/cold", "messages": [{"role": "user", "content": 7}]}
            response = await http.post("/v1/chat/completions", json=bad)
            assert response.status_code == 400
            assert response.json()["error"]["param"] == "messages[0].content"
        seen = calls(port)
        assert (seen["loads"], seen["unloads"], seen["chats"]) == ([], [], 0)


async def test_a_request_to_a_hung_neuron_fails_once_and_is_not_repeated(tmp_path: Path) -> None:
    hung_port, other_port = free_port(), free_port()
    with (
        neuron_process(tmp_path, "a", hung_port, "--preload", "org/m") as hung,
        neuron_process(tmp_path, "b", other_port, "--preload", "org/m"),
    ):
        async with gateway(
            {"a": hung_port, "b": other_port}, proxy={"idle_timeout_secs": 1.0, "max_attempts": 2}
        ) as http:
            await loaded_on(http, ["a", "b"], "both replicas polled")
            # A first request learns both replicas' inference URLs; it goes to `a`, as the
            # next will: equally idle replicas go by name.
            assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
            assert (calls(hung_port)["chats"], calls(other_port)["chats"]) == (1, 0)
            os.kill(hung.process.pid, signal.SIGSTOP)
            try:
                response = await http.post("/v1/chat/completions", json=CHAT)
            finally:
                os.kill(hung.process.pid, signal.SIGCONT)
            assert response.status_code == 504
            assert response.json()["error"]["code"] == "upstream_timeout"

            async def received() -> bool:
                return calls(hung_port)["chats"] >= 2

            await eventually(received, "the stopped neuron reads the request it was sent")
        # Sent once to the hung neuron, and not repeated there or anywhere else.
        assert (calls(hung_port)["chats"], calls(other_port)["chats"]) == (2, 0)
