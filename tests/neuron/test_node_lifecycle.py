"""The neuron app in process: every lifecycle route, with tiny real checkpoints and the real engine."""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx2
import pytest
from support.fake_hf_cache import add_to_hf_cache
from support.fake_nvml import FakeGpu, FakeNvml
from support.local_models import neuron_config
from support.tiny_gguf import write_tiny_llama_gguf

import neuron.torch_harness as torch_harness_module
from cortex_core.config.neuron import NeuronConfig, SourceConfig
from cortex_core.neuron_api import ModelLoad, ModelSpec
from neuron.app import create_app
from neuron.discovery import HostProbe
from neuron.loader import LoadedCheckpoint, load_checkpoint
from neuron.manager import ModelManager
from neuron.preflight import required_bytes
from neuron.torch_harness import default_engine_factory

MIB = 1024 * 1024
HANG_GUARD_SECS = 60.0


class SmallHost(HostProbe):
    """A CPU-only host whose free memory the test decides."""

    def __init__(self, free_bytes: int | None = None) -> None:
        super().__init__(None, cuda_unavailable_reason="test host: CPU only")
        self._free = free_bytes

    def free_bytes(self, device: int | None) -> int:
        return super().free_bytes(device) if self._free is None else self._free


def cpu_host() -> HostProbe:
    return SmallHost()


class Node:
    """An app, its manager and a client, plus a count of checkpoint loads."""

    def __init__(self, config: NeuronConfig, probe: HostProbe, monkeypatch: pytest.MonkeyPatch) -> None:
        self.loads: list[Path] = []
        self.models: list[weakref.ref[Any]] = []
        # Clear `release_loads` to hold a checkpoint load open (it runs on a worker thread)
        # until the test has seen the model loading; `load_entered` says one has begun.
        self.release_loads = threading.Event()
        self.release_loads.set()
        self.load_entered = threading.Event()

        def counting_load(folder: Path, gguf_file: str | None, device: int | None) -> LoadedCheckpoint:
            self.loads.append(folder)
            self.load_entered.set()
            if not self.release_loads.wait(HANG_GUARD_SECS):
                raise AssertionError("the test never released the load")
            checkpoint = load_checkpoint(folder, gguf_file, device)
            self.models.append(weakref.ref(checkpoint.model))
            return checkpoint

        monkeypatch.setattr(torch_harness_module, "load_checkpoint", counting_load)
        self.manager = ModelManager(config, probe, engine_factory=default_engine_factory)
        self.app = create_app(config, probe=probe, manager=self.manager)
        self.client = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=self.app), base_url="http://test")


@pytest.fixture
async def make_node(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Callable[..., Node]]:
    nodes: list[Node] = []

    def make(config: NeuronConfig | None = None, probe: HostProbe | None = None) -> Node:
        node = Node(config or neuron_config(), probe or cpu_host(), monkeypatch)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        await node.client.aclose()
        await node.manager.close()


def endpoint_path(model_id: str) -> str:
    return f"/models/{quote(model_id, safe='')}/endpoint"


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


async def test_load_list_endpoint_unload_a_local_folder(
    make_node: Callable[..., Node], tiny_qwen3: Path
) -> None:
    node = make_node()
    model_id = str(tiny_qwen3)
    response = await node.client.post("/models/load", json={"model_id": model_id, "harness": "torch"})
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "loaded"
    assert response.json()["model_id"] == model_id

    [info] = (await node.client.get("/models")).json()
    assert info["id"] == model_id
    assert info["status"] == "loaded"
    assert info["harness"] == "torch"
    # Derived from the model: text in (no vision tower), tools in its template, <think> in its vocabulary.
    assert info["capabilities"] == ["text", "tool_call", "reasoning"]
    # The output a request can get is the window less the one token a prompt needs at least.
    assert info["limit"] == {"context": 1024, "input": 1023, "output": 1023}
    assert info["reasoning"] is True and info["tool_call"] is True
    # 400 KB of weights plus the K/V pool (a full batch of full-context sequences: 4 MiB).
    assert info["vram_used_mb"] == node.manager._records[model_id].memory_bytes // MIB == 4
    assert "devices" not in info  # CPU: no device index

    # Percent-encoded (as the gateway sends it) and raw.
    for path in (endpoint_path(model_id), f"/models/{model_id}/endpoint"):
        endpoint = await node.client.get(path)
        assert endpoint.status_code == 200, endpoint.text
        assert endpoint.json() == {"url": "http://test"}

    # Loading a loaded model is a no-op success.
    again = await node.client.post("/models/load", json={"model_id": model_id})
    assert again.status_code == 200
    assert len(node.loads) == 1

    health = (await node.client.get("/health")).json()
    assert [m["id"] for m in health["models"]] == [model_id]

    unload = await node.client.post("/models/unload", json={"model_id": model_id})
    assert unload.json() == {"status": "unloaded", "model_id": model_id}
    assert (await node.client.get("/models")).json() == []
    # The weights are gone, not just unlisted.
    assert node.models[0]() is None

    missing = await node.client.post("/models/unload", json={"model_id": model_id})
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"
    gone = await node.client.get(endpoint_path(model_id))
    assert gone.status_code == 404
    assert "not loaded" in gone.json()["error"]["message"]


def device_tensors(runner: Any) -> list[Any]:
    """Every tensor a prepared runner holds: parameters, buffers, packed weights, the K/V pool."""
    import torch

    model = runner.model
    tensors = [*model.parameters(), *model.buffers()]
    # Packed CPU linears keep their reordered weights as plain attributes.
    tensors += [v for m in model.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)]
    return [*tensors, *runner.pool.keys, *runner.pool.values]


@pytest.fixture
async def qwen3_node(make_node: Callable[..., Node], tiny_qwen3: Path) -> tuple[Node, str]:
    """A node with tiny_qwen3 loaded through its API, and the model's id."""
    node = make_node()
    model_id = str(tiny_qwen3)
    assert (await node.client.post("/models/load", json={"model_id": model_id})).status_code == 200
    return node, model_id


async def test_unload_leaves_no_strong_path_to_any_weight_or_the_pool(qwen3_node: tuple[Node, str]) -> None:
    node, model_id = qwen3_node
    chat = await node.client.post(
        "/v1/chat/completions",
        json={"model": model_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
    )
    assert chat.status_code == 200, chat.text  # the runner is prepared: pool allocated, decoder built
    # A request handler that has not let go of its model yet, across the unload.
    in_flight_holder = node.manager.get(model_id)
    tensors = [weakref.ref(t) for t in device_tensors(in_flight_holder.engine.runner)]
    assert len(tensors) > 10

    unload = await node.client.post("/models/unload", json={"model_id": model_id})
    assert unload.status_code == 200, unload.text
    assert [ref for ref in tensors if ref() is not None] == []
    assert node.models[0]() is None
    assert in_flight_holder.engine.runner.model is None


async def test_the_k_v_pool_is_allocated_during_the_load_and_counted_in_its_memory(
    qwen3_node: tuple[Node, str],
) -> None:
    node, model_id = qwen3_node
    runner = node.manager.get(model_id).engine.runner
    # Allocated on the owner thread before the load returned (no request has run yet).
    assert runner.pool is not None
    assert runner.kv_cache_bytes == runner.pool.nbytes > 0
    weights = sum(t.numel() * t.element_size() for t in (*runner.model.parameters(), *runner.model.buffers()))
    assert node.manager._records[model_id].memory_bytes == weights + runner.pool.nbytes


class StopsButKeepsItsModel:
    """An engine whose close() stops it but frees nothing: only the manager letting go of
    every path to it can free the model."""

    def __init__(self, checkpoint: LoadedCheckpoint) -> None:
        self.model = checkpoint.model

    def generate(self, request: Any) -> Any:
        raise AssertionError("not used")

    def load(self) -> ModelLoad:
        return ModelLoad(id="kept")

    async def close(self) -> None:
        return None


async def test_the_manager_lets_go_of_a_model_before_releasing_its_memory(
    tiny_qwen3: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models: list[weakref.ref[Any]] = []
    alive_at_release: list[bool] = []

    def factory(checkpoint: LoadedCheckpoint, worker: Any, config: Any, model_id: str, on_fault: Any) -> Any:
        models.append(weakref.ref(checkpoint.model))
        return StopsButKeepsItsModel(checkpoint)

    def release(device: int | None) -> int | None:
        gc.collect()
        alive_at_release.append(models[0]() is not None)
        return None

    monkeypatch.setattr(torch_harness_module, "release_memory", release)
    manager = ModelManager(neuron_config(), cpu_host(), engine_factory=factory)
    try:
        await manager.load(ModelSpec(model_id=str(tiny_qwen3)))
        await manager.unload(str(tiny_qwen3))
    finally:
        await manager.close()
    assert alive_at_release == [False]


async def test_a_device_fault_in_one_model_poisons_every_model_on_that_device(
    tiny_qwen3: Path, tmp_path: Path
) -> None:
    import torch

    from neuron.engine import SingleDeviceRunner, TorchEngine

    class AssertsOnSeven(SingleDeviceRunner):
        """Kernels that hit a device-side assert when a prompt holds token 7."""

        def forward(self, rows: Any) -> torch.Tensor:
            if any(7 in row.tokens for row in rows):
                raise RuntimeError("CUDA error: device-side assert triggered")
            return super().forward(rows)

    def factory(checkpoint: LoadedCheckpoint, worker: Any, config: Any, model_id: str, on_fault: Any) -> Any:
        runner = AssertsOnSeven(checkpoint.model, device="cpu")
        return TorchEngine(runner, worker=worker, config=config, model_id=model_id, on_device_fault=on_fault)

    config = neuron_config()
    manager = ModelManager(config, cpu_host(), engine_factory=factory)
    app = create_app(config, probe=manager.probe, manager=manager)
    client = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test")
    first, second = str(tiny_qwen3), str(copy_model(tiny_qwen3, tmp_path / "second"))
    try:
        for model_id in (first, second):
            assert (await client.post("/models/load", json={"model_id": model_id})).status_code == 200
        failed = await client.post(
            "/v1/completions", json={"model": first, "prompt": [7, 8, 9], "max_tokens": 2}
        )
        assert failed.status_code == 500, failed.text

        listed = {info["id"]: info for info in (await client.get("/models")).json()}
        for model_id in (first, second):
            assert listed[model_id]["status"] == "poisoned"
            assert "device-side assert" in listed[model_id]["error"]
            assert f"model '{first}'" in listed[model_id]["error"]
        refused = await client.post(
            "/v1/completions", json={"model": second, "prompt": [8, 9], "max_tokens": 2}
        )
        assert refused.status_code == 500
        assert refused.json()["error"]["code"] == "model_poisoned"

        # Unload and load again recovers (on a real GPU: once the process let go of the context).
        assert (await client.post("/models/unload", json={"model_id": second})).status_code == 200
        assert (await client.post("/models/load", json={"model_id": second})).status_code == 200
        ok = await client.post("/v1/completions", json={"model": second, "prompt": [8, 9], "max_tokens": 2})
        assert ok.status_code == 200, ok.text
    finally:
        await client.aclose()
        await manager.close()


async def test_a_folder_is_served_and_listed_under_its_served_model_name(
    make_node: Callable[..., Node], tiny_qwen3: Path
) -> None:
    node = make_node()
    spec = {"model_id": str(tiny_qwen3), "served_model_name": "tiny-chat"}
    response = await node.client.post("/models/load", json=spec)
    assert response.status_code == 200, response.text
    assert response.json()["model_id"] == "tiny-chat"
    assert [info["id"] for info in (await node.client.get("/models")).json()] == ["tiny-chat"]
    assert (await node.client.get(endpoint_path("tiny-chat"))).status_code == 200
    assert (await node.client.get(endpoint_path(str(tiny_qwen3)))).status_code == 404

    chat = await node.client.post(
        "/v1/chat/completions",
        json={"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
    )
    assert chat.status_code == 200, chat.text
    assert chat.json()["model"] == "tiny-chat"

    # Loading it again by its served name is a no-op, not a second load.
    assert (await node.client.post("/models/load", json=spec)).status_code == 200
    assert len(node.loads) == 1
    unload = await node.client.post("/models/unload", json={"model_id": "tiny-chat"})
    assert unload.status_code == 200


async def test_concurrent_identical_loads_share_one(make_node: Callable[..., Node], tiny_qwen3: Path) -> None:
    node = make_node()
    body = {"model_id": str(tiny_qwen3)}
    responses = await asyncio.gather(*(node.client.post("/models/load", json=body) for _ in range(6)))
    direct = await asyncio.gather(*(node.manager.load(ModelSpec(model_id=str(tiny_qwen3))) for _ in range(4)))
    assert [r.status_code for r in responses] == [200] * 6
    assert {info.status for info in direct} == {"loaded"}
    assert len(node.loads) == 1


async def test_a_model_that_is_loading_reports_loading_and_refuses_unload(
    make_node: Callable[..., Node], tiny_llama: Path
) -> None:
    node = make_node()
    model_id = str(tiny_llama)
    node.release_loads.clear()  # a fast load would otherwise finish before the checks below
    load = asyncio.create_task(node.client.post("/models/load", json={"model_id": model_id}))
    assert await asyncio.to_thread(node.load_entered.wait, HANG_GUARD_SECS), "the load never began"
    [info] = (await node.client.get("/models")).json()
    assert info["status"] == "loading"
    refused = await node.client.post("/models/unload", json={"model_id": model_id})
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "5"
    busy = await node.client.get(endpoint_path(model_id))
    assert busy.status_code == 503 and "retry-after" in busy.headers
    node.release_loads.set()
    assert (await load).status_code == 200


async def test_unknown_architecture_is_refused_before_weights_and_shown_as_failed(
    make_node: Callable[..., Node], tiny_qwen3: Path, tmp_path: Path
) -> None:
    folder = copy_model(tiny_qwen3, tmp_path / "odd")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "not_a_real_arch"
    (folder / "config.json").write_text(json.dumps(config))
    node = make_node()
    response = await node.client.post("/models/load", json={"model_id": str(folder)})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "unsupported_architecture"
    assert "unsupported model_type 'not_a_real_arch'" in error["message"]
    assert str(folder) in error["message"]
    assert "qwen3" in error["message"] and "llama" in error["message"]
    assert node.loads == []  # refused before anything was loaded

    [info] = (await node.client.get("/models")).json()
    assert info["status"] == "failed"
    assert "not_a_real_arch" in info["error"]
    # Serving a failed model says why it is not there.
    failed = await node.client.get(endpoint_path(str(folder)))
    assert failed.status_code == 404 and "failed to load" in failed.json()["error"]["message"]

    # Fixing the cause and loading again works; unloading a failed entry clears it.
    config["model_type"] = "qwen3"
    (folder / "config.json").write_text(json.dumps(config))
    assert (await node.client.post("/models/load", json={"model_id": str(folder)})).status_code == 200
    assert (await node.client.get("/models")).json()[0]["status"] == "loaded"


async def test_a_model_too_big_for_free_memory_is_refused_with_the_numbers(
    make_node: Callable[..., Node], tiny_qwen3: Path
) -> None:
    node = make_node(probe=SmallHost(free_bytes=100 * MIB))
    response = await node.client.post("/models/load", json={"model_id": str(tiny_qwen3)})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "insufficient_memory"
    assert error["free_mb"] == 100
    assert error["required_mb"] >= 256
    assert "100 MiB is free" in error["message"]
    assert node.loads == []


async def test_two_loads_in_flight_cannot_both_claim_the_same_free_memory(
    make_node: Callable[..., Node], tiny_qwen3: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Room for one tiny model (weights + the runtime headroom pre-flight asks for), not two.
    weights = (tiny_qwen3 / "model.safetensors").stat().st_size
    node = make_node(probe=SmallHost(free_bytes=required_bytes(weights) * 3 // 2))
    first_loading, release_first = threading.Event(), threading.Event()
    load = torch_harness_module.load_checkpoint

    def held_load(folder: Path, gguf_file: str | None, device: int | None) -> LoadedCheckpoint:
        if folder == tiny_qwen3:
            first_loading.set()
            release_first.wait(30)
        return load(folder, gguf_file, device)

    monkeypatch.setattr(torch_harness_module, "load_checkpoint", held_load)
    first = asyncio.create_task(node.client.post("/models/load", json={"model_id": str(tiny_qwen3)}))
    assert await asyncio.to_thread(first_loading.wait, 30)
    # The host's free-memory reading has not moved yet; only the reservation knows.
    second = await node.client.post("/models/load", json={"model_id": str(tiny_llama)})
    release_first.set()
    assert (await first).status_code == 200
    assert second.status_code == 422, second.text
    assert second.json()["error"]["code"] == "insufficient_memory"
    # Once the first load is done its reservation is gone (the probe would now show the weights).
    assert node.manager._reserved == {None: 0}


async def test_a_model_too_big_for_the_chosen_gpu_is_refused(
    make_node: Callable[..., Node], tiny_qwen3: Path
) -> None:
    nvml = FakeNvml(gpus=[FakeGpu(total_mb=24576, used_mb=24500), FakeGpu(total_mb=1024, used_mb=0)])
    probe = HostProbe.open(nvml, cuda_uuids=nvml.cuda_uuids())
    node = make_node(probe=probe)
    response = await node.client.post("/models/load", json={"model_id": str(tiny_qwen3), "devices": [0]})
    assert response.status_code == 422
    assert "does not fit on GPU 0" in response.json()["error"]["message"]
    assert response.json()["error"]["free_mb"] == 76
    unknown = await node.client.post("/models/load", json={"model_id": str(tiny_qwen3), "devices": [5]})
    assert unknown.status_code == 422 and unknown.json()["error"]["code"] == "device_unavailable"


async def test_devices_on_a_cpu_only_host_are_refused(
    make_node: Callable[..., Node], tiny_qwen3: Path
) -> None:
    node = make_node()
    response = await node.client.post("/models/load", json={"model_id": str(tiny_qwen3), "devices": [0]})
    assert response.status_code == 422
    assert "no usable GPU (test host: CPU only)" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("remove", "index_shards", "named"),
    [
        (["tokenizer.json"], None, "tokenizer.json or tokenizer.model or vocab.json"),
        (["config.json"], None, "config.json"),
        (
            ["model.safetensors"],
            ["model.safetensors", "model-00002-of-00002.safetensors"],
            "model-00002-of-00002.safetensors",
        ),
    ],
)
async def test_missing_files_are_named(
    make_node: Callable[..., Node],
    tiny_qwen3: Path,
    tmp_path: Path,
    remove: list[str],
    index_shards: list[str] | None,
    named: str,
) -> None:
    folder = copy_model(tiny_qwen3, tmp_path / "partial")
    if index_shards:
        # A sharded checkpoint whose second shard never arrived.
        (folder / "model.safetensors").rename(
            folder / index_shards[0].replace("model.", "model-00001-of-00002.")
        )
        weight_map = {"a": "model-00001-of-00002.safetensors", "b": index_shards[1]}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        for name in remove:
            (folder / name).unlink()
    node = make_node()
    response = await node.client.post("/models/load", json={"model_id": str(folder)})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "missing_files"
    assert named in response.json()["error"]["message"]
    assert node.loads == []


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"", 400, "empty"),
        (b"{not json", 400, "not valid JSON"),
        (b'{"harness": "torch"}', 400, "model_id"),
        (
            b'{"model_id": "x/y", "harness": "vllm"}',
            422,
            "unknown harness 'vllm' for model 'x/y'; this neuron runs ['torch']",
        ),
        (b'{"model_id": "noslash"}', 400, "missing the '/'"),
        (b'{"model_id": "unknownscheme:o/m"}', 400, "[sources.unknownscheme]"),
        (b'{"model_id": "/tmp/no/such/folder"}', 404, "nothing exists there"),
        (b'{"model_id": "/etc"}', 403, "outside the directories this neuron loads models from"),
        (b'{"model_id": "/tmp/../etc/passwd"}', 403, "outside the directories this neuron loads models from"),
        (b'{"model_id": "o/m", "tensor_parallel": 2}', 422, "allow_cpu_tensor_parallel = true"),
    ],
)
async def test_bad_load_requests_get_actionable_errors(
    make_node: Callable[..., Node], body: bytes, status: int, fragment: str
) -> None:
    node = make_node()
    response = await node.client.post("/models/load", content=body)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]["message"]


async def test_unknown_routes_answer_json(make_node: Callable[..., Node]) -> None:
    node = make_node()
    response = await node.client.get("/nope")
    assert response.status_code == 404
    assert "no route GET /nope" in response.json()["error"]["message"]
    wrong_method = await node.client.get("/models/load")
    assert wrong_method.status_code == 405


async def test_a_gguf_file_loads_dequantised(
    make_node: Callable[..., Node], tiny_llama: Path, tmp_path: Path
) -> None:
    gguf = write_tiny_llama_gguf(tiny_llama, tmp_path / "tiny-llama.F32.gguf")
    node = make_node()
    response = await node.client.post("/models/load", json={"model_id": str(gguf)})
    assert response.status_code == 200, response.text
    [info] = (await node.client.get("/models")).json()
    assert info["status"] == "loaded"
    loaded = node.manager.get(str(gguf))
    assert loaded.chat_template is not None and "<|im_start|>" in loaded.chat_template
    assert loaded.tokenizer.encode("The capital of France") == load_checkpoint(
        tiny_llama, None, None
    ).tokenizer.encode("The capital of France")


async def test_hub_ids_load_offline_from_the_hf_cache(
    make_node: Callable[..., Node], tiny_qwen3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub_cache = tmp_path / "hf-home" / "hub"
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    add_to_hf_cache(hub_cache, "tiny-org/tiny-qwen3", tiny_qwen3)
    mirror_cache = tmp_path / "mirror-cache"
    add_to_hf_cache(mirror_cache, "tiny-org/tiny-qwen3", tiny_qwen3)
    config = neuron_config(
        sources={
            "mirror": SourceConfig(
                endpoint="http://127.0.0.1:9", auth_env="MIRROR_TOKEN", cache_dir=str(mirror_cache)
            )
        }
    )
    node = make_node(config)

    for model_id in ("tiny-org/tiny-qwen3", "mirror:tiny-org/tiny-qwen3"):
        response = await node.client.post("/models/load", json={"model_id": model_id})
        assert response.status_code == 200, response.text
        endpoint = await node.client.get(endpoint_path(model_id))
        assert endpoint.status_code == 200
    assert {p.parent.parent for p in node.loads} == {
        hub_cache / "models--tiny-org--tiny-qwen3",
        mirror_cache / "models--tiny-org--tiny-qwen3",
    }

    absent = await node.client.post("/models/load", json={"model_id": "tiny-org/not-cached"})
    assert absent.status_code == 404
    error = absent.json()["error"]
    assert error["code"] == "model_not_cached"
    assert "HF_HUB_OFFLINE" in error["message"] and str(hub_cache) in error["message"]


async def test_default_models_activate_in_the_background(
    make_node: Callable[..., Node], tiny_qwen3: Path, tiny_llama: Path
) -> None:
    specs = [
        ModelSpec(model_id=str(tiny_qwen3)),
        ModelSpec(model_id="/no/such/model"),
        ModelSpec(model_id=str(tiny_llama)),
    ]
    node = make_node(neuron_config(default_models=specs))
    async with node.app.router.lifespan_context(node.app):
        health: dict[str, Any] = {}
        for _ in range(600):
            health = (await node.client.get("/health")).json()
            if health["activation"]["state"] == "ready":
                break
            await asyncio.sleep(0.02)
        activation = health["activation"]
        assert activation["state"] == "ready"
        assert activation["completed"] == [str(tiny_qwen3), str(tiny_llama)]
        assert [f["model_id"] for f in activation["failed"]] == ["/no/such/model"]
        assert "nothing exists there" in activation["failed"][0]["error"]
        models = {m["id"]: m["status"] for m in (await node.client.get("/models")).json()}
        assert models == {str(tiny_qwen3): "loaded", str(tiny_llama): "loaded", "/no/such/model": "failed"}
    # Shutdown (lifespan exit) unloads everything.
    assert node.manager.models() == []


async def test_metrics_version_and_a_generation_through_the_real_engine(qwen3_node: tuple[Node, str]) -> None:
    node, model_id = qwen3_node
    chat = await node.client.post(
        "/v1/chat/completions",
        json={
            "model": model_id,
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 4,
            "temperature": 0,
        },
    )
    assert chat.status_code == 200, chat.text
    generated = chat.json()["usage"]["completion_tokens"]
    assert generated >= 1

    metrics = (await node.client.get("/metrics")).text
    label = f'model="{model_id}"'
    assert "neuron_models_loaded 1.0" in metrics
    assert f"neuron_model_load_duration_seconds_count{{{label}}} 1.0" in metrics
    assert f"neuron_requests_total{{{label}}} 1.0" in metrics
    assert f"neuron_tokens_generated_total{{{label}}} {float(generated)}" in metrics
    assert f"neuron_requests_running{{{label}}} 0.0" in metrics
    assert f"neuron_requests_waiting{{{label}}} 0.0" in metrics
    assert 'neuron_device_memory_free_bytes{device="cpu"}' in metrics
    assert f"neuron_model_memory_bytes{{{label}}}" in metrics

    version = (await node.client.get("/version")).json()
    assert version["name"] == "neuron" and version["torch"].startswith("2.")

    unknown = await node.client.post(
        "/v1/chat/completions", json={"model": "o/absent", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert unknown.status_code == 404
