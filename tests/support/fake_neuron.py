"""Fake neurons for gateway tests: the neuron management API as a small Starlette app.

`FakeNeuron` keeps a device list (or none: a CPU-only host), the resident models and their
memory, and answers /discovery, /health, /models, /models/load, /models/unload and
/models/{id}/endpoint like a real neuron. Loads can be held open (`hold_loads`), made to
fail (`fail_loads[model] = (status, reason)`), and are counted (`load_calls`); unloads can be
held too (`hold_unloads`); `down = True`
makes the neuron unreachable.

`AsgiNeuronTransport` is the `HttpTransport` seam of `NeuronClient` pointed at fake neurons
in process (no sockets): it dispatches on the URL's host. Serve `FakeNeuron.app` on loopback
(e.g. tests.support.fake_upstream.on_hypercorn) to test the aiohttp transport itself.
`inference_url` is what /models/{id}/endpoint answers; point it at a FakeUpstream to test
the proxy routes end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx2
import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from cortex_core.config.catalogue import ModelCatalogue
from cortex_core.config.gateway import GatewayConfig


@dataclass
class FakeModel:
    id: str
    status: str = "loaded"
    memory_mb: int = 0
    devices: list[int] = field(default_factory=lambda: [0])
    error: str | None = None
    in_flight: int = 0


class FakeNeuron:
    def __init__(
        self,
        name: str,
        *,
        devices_mb: list[int] | None = None,
        host_memory_mb: int = 16_000,
        sizes_mb: dict[str, int] | None = None,
        inference_url: str = "http://localhost:13131",
        endpoint: str | None = None,
    ) -> None:
        """`devices_mb`: total memory per GPU ([] or None: CPU-only); `sizes_mb`: what a load costs."""
        self.name = name
        self.devices_mb = list(devices_mb or [])
        self.host_memory_mb = host_memory_mb
        self.sizes_mb = dict(sizes_mb or {})
        self.inference_url = inference_url
        # Where the gateway is told the neuron lives (its [[neurons]] endpoint). The loopback
        # rewrite puts this host into `inference_url`, so a neuron whose inference should
        # reach a real loopback server needs a 127.0.0.1 endpoint (any port: in process).
        self.endpoint = endpoint or f"http://{name}:13131"
        self.models: dict[str, FakeModel] = {}
        self.down = False
        self.uptime = 1.0
        self.load_calls: list[dict[str, object]] = []
        self.unload_calls: list[str] = []
        self.fail_loads: dict[str, tuple[int, str]] = {}
        # The ground truth a fault test checks: loads that would not have fitted the device
        # (refused like a real neuron's pre-flight), and loads of a model already loading here.
        self.overcommitted: list[str] = []
        self.duplicate_loads: list[str] = []
        # While clear, loads wait (the model shows `loading`); set it to let them finish.
        self.hold_loads = asyncio.Event()
        self.hold_loads.set()
        self.load_started = asyncio.Event()
        # The same for unloads: while clear, an unload call waits (the model stays resident).
        self.hold_unloads = asyncio.Event()
        self.hold_unloads.set()
        self.unload_started = asyncio.Event()
        self.app = Starlette(
            routes=[
                Route("/discovery", self._discovery),
                Route("/health", self._health),
                Route("/models", self._models),
                Route("/models/load", self._load, methods=["POST"]),
                Route("/models/unload", self._unload, methods=["POST"]),
                Route("/models/{model_id:path}/endpoint", self._endpoint),
            ]
        )

    @property
    def base_url(self) -> str:
        return self.endpoint

    def preload(self, model_id: str, memory_mb: int | None = None, *, device: int = 0) -> None:
        devices = [device] if self.devices_mb else []
        size = memory_mb if memory_mb is not None else self.sizes_mb.get(model_id, 0)
        self.models[model_id] = FakeModel(model_id, memory_mb=size, devices=devices)

    def used_mb(self, device: int) -> int:
        return (
            sum(m.memory_mb // max(1, len(m.devices)) for m in self.models.values() if device in m.devices)
            if device >= 0
            else sum(m.memory_mb for m in self.models.values())
        )

    async def _discovery(self, request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "hostname": self.name,
                "os": "Linux",
                "kernel": "6.0",
                "devices": [
                    {"index": i, "name": "Fake GPU", "vram_total_mb": total}
                    for i, total in enumerate(self.devices_mb)
                ],
                "harnesses": ["torch"],
                "cuda_unavailable_reason": None if self.devices_mb else "no NVML",
                "host_memory_total_mb": self.host_memory_mb,
            }
        )

    async def _health(self, request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "uptime_secs": self.uptime,
                "devices": [
                    {"index": i, "vram_used_mb": self.used_mb(i), "vram_free_mb": total - self.used_mb(i)}
                    for i, total in enumerate(self.devices_mb)
                ],
                "models": [
                    {"id": m.id, "in_flight": m.in_flight, "queue_depth": 0} for m in self.models.values()
                ],
                "host_memory_free_mb": self.host_memory_mb - self.used_mb(-1),
            }
        )

    async def _models(self, request: Request) -> JSONResponse:
        return JSONResponse(
            [
                {
                    "id": m.id,
                    "harness": "torch",
                    "status": m.status,
                    "devices": m.devices,
                    "vram_used_mb": m.memory_mb or None,
                    "capabilities": ["text"],
                    **({"error": m.error} if m.error else {}),
                }
                for m in self.models.values()
            ]
        )

    async def _load(self, request: Request) -> JSONResponse:
        spec = json.loads(await request.body())
        self.load_calls.append(spec)
        model_id = spec.get("served_model_name") or spec["model_id"]
        if model_id in self.models and self.models[model_id].status == "loaded":
            return JSONResponse({"status": "loaded", "model_id": model_id})
        if model_id in self.models and self.models[model_id].status == "loading":
            self.duplicate_loads.append(model_id)
        devices = spec.get("devices") or ([0] if self.devices_mb else [])
        size = self.sizes_mb.get(model_id, 0)
        short = self._does_not_fit(devices, size)
        if short is not None:
            self.overcommitted.append(f"{model_id}: {short}")
            return JSONResponse({"error": f"'{model_id}' does not fit: {short}"}, status_code=507)
        # A loading model holds its memory from the start, as a real load does.
        self.models[model_id] = FakeModel(model_id, status="loading", devices=devices, memory_mb=size)
        self.load_started.set()
        await self.hold_loads.wait()
        if model_id in self.fail_loads:
            status, reason = self.fail_loads[model_id]
            self.models[model_id] = FakeModel(model_id, status="failed", devices=devices, error=reason)
            return JSONResponse({"error": reason}, status_code=status)
        self.models[model_id] = FakeModel(model_id, memory_mb=self.sizes_mb.get(model_id, 0), devices=devices)
        return JSONResponse({"status": "loaded", "model_id": model_id, "load_seconds": 0.01})

    def _does_not_fit(self, devices: list[int], size_mb: int) -> str | None:
        if not self.devices_mb or not size_mb:
            return None
        share = size_mb // max(1, len(devices))
        for device in devices:
            free = self.devices_mb[device] - self.used_mb(device)
            if free < share:
                return f"device {device} has {free} MB free, {share} MB needed"
        return None

    async def _unload(self, request: Request) -> JSONResponse:
        model_id = json.loads(await request.body())["model_id"]
        self.unload_calls.append(model_id)
        self.unload_started.set()
        await self.hold_unloads.wait()
        if self.models.pop(model_id, None) is None:
            return JSONResponse({"error": f"model '{model_id}' not loaded"}, status_code=404)
        return JSONResponse({"status": "unloaded", "model_id": model_id})

    async def _endpoint(self, request: Request) -> JSONResponse:
        model_id = request.path_params["model_id"]
        model = self.models.get(model_id)
        if model is None or model.status != "loaded":
            return JSONResponse({"error": f"model '{model_id}' not loaded"}, status_code=404)
        return JSONResponse({"url": self.inference_url})


class AsgiNeuronTransport:
    """NeuronClient's HTTP seam, answered in process by the fake neuron the URL names."""

    def __init__(self, neurons: list[FakeNeuron]) -> None:
        self._neurons = {urlsplit(n.base_url).netloc: n for n in neurons}
        self._clients = {
            netloc: httpx2.AsyncClient(transport=httpx2.ASGITransport(app=n.app), base_url=n.base_url)
            for netloc, n in self._neurons.items()
        }

    async def request(self, method: str, url: str, body: bytes | None) -> tuple[int, bytes]:
        netloc = urlsplit(url).netloc
        neuron = self._neurons.get(netloc)
        if neuron is None or neuron.down:
            raise ConnectionRefusedError(f"cannot connect to {netloc}")
        response = await self._clients[netloc].request(method, url, content=body)
        return response.status_code, response.content

    async def close(self) -> None:
        for client in self._clients.values():
            await client.aclose()


class FakeClock:
    """A wall clock the test moves by hand (residency, back-off, last use)."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def relaying_neuron(upstream_url: str, *preloaded: str) -> FakeNeuron:
    """Node "a" with one 24 GB GPU and each of `preloaded` loaded (1 GB each), whose inference
    requests reach `upstream_url`, a scripted neuron on loopback (hence the 127.0.0.1 endpoint:
    the gateway's loopback rewrite keeps that host)."""
    neuron = FakeNeuron("a", devices_mb=[24_000], endpoint="http://127.0.0.1:1", inference_url=upstream_url)
    for model_id in preloaded:
        neuron.preload(model_id, 1_000)
    return neuron


def in_process_client(app: Starlette) -> httpx2.AsyncClient:
    """A client that calls the gateway `app` in process, for an SDK's `http_client`."""
    return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://gateway")


def gateway_config(neurons: list[FakeNeuron], **sections: dict[str, object]) -> GatewayConfig:
    """A GatewayConfig naming the fake neurons; `sections` override e.g. router={...}."""
    data: dict[str, object] = {"neurons": [{"name": n.name, "endpoint": n.base_url} for n in neurons]}
    data.update(sections)
    return msgspec.convert(data, GatewayConfig)


@contextlib.asynccontextmanager
async def gateway(
    neurons: list[FakeNeuron],
    catalogue: ModelCatalogue,
    *,
    clock: FakeClock | None = None,
    poll: bool = True,
    **sections: dict[str, object],
) -> AsyncIterator[tuple[Starlette, httpx2.AsyncClient]]:
    """The real gateway app over fake neurons, in process, lifespan run, poller driven by hand.

    With `poll`, one poll cycle has run, so the fleet is known before the first request.
    """
    from cortex_gateway.app import create_app
    from cortex_gateway.neuron_client import NeuronClient

    client = NeuronClient(AsgiNeuronTransport(neurons), poll_timeout=2.0)
    app = create_app(
        gateway_config(neurons, **sections),
        catalogue,
        neuron_client=client,
        clock=clock or FakeClock(),
        run_poller=False,
    )
    async with app.router.lifespan_context(app):
        if poll:
            await app.state.poller.poll_once()
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://gateway") as http:
            yield app, http
