"""The real `neuron serve` process on loopback, as docs/neuron.md tells a new user to run it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx2
import pytest
from support.fake_hf_cache import add_to_hf_cache

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_SECS = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def neuron_command() -> list[str]:
    script = Path(sys.executable).with_name("neuron")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from neuron.cli import main; main()"]


def wait_until_ready(client: httpx2.Client, process: subprocess.Popen[bytes]) -> dict[str, Any]:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECS
    while time.monotonic() < deadline:
        assert process.poll() is None, "neuron serve exited during startup"
        try:
            health: dict[str, Any] = client.get("/health").json()
        except httpx2.TransportError:
            time.sleep(0.2)
            continue
        if health["activation"]["state"] == "ready":
            return health
        time.sleep(0.2)
    raise AssertionError("default models did not finish loading in time")


def test_neuron_serve_loads_from_the_hf_cache_and_exits_cleanly_on_sigterm(
    tmp_path: Path, tiny_qwen3: Path, tiny_llama: Path
) -> None:
    hf_home = tmp_path / "hf-home"
    add_to_hf_cache(hf_home / "hub", "tiny-org/tiny-qwen3", tiny_qwen3)
    add_to_hf_cache(hf_home / "hub", "tiny-org/tiny-llama", tiny_llama)
    port = free_port()
    config = tmp_path / "neuron.toml"
    config.write_text(
        f'host = "127.0.0.1"\nport = {port}\ndrain_timeout_secs = 5\n\n'
        '[[default_models]]\nmodel_id = "tiny-org/tiny-qwen3"\n'
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "NEURON_PORT", "NEURON_HOST")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    log_path = tmp_path / "neuron.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*neuron_command(), "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        with httpx2.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            health = wait_until_ready(client, process)
            assert health["activation"]["completed"] == ["tiny-org/tiny-qwen3"]
            discovery = client.get("/discovery").json()
            assert discovery["harnesses"] == ["torch"]
            assert discovery["devices"] == [] and discovery["cuda_unavailable_reason"]
            assert [(m["id"], m["status"]) for m in client.get("/models").json()] == [
                ("tiny-org/tiny-qwen3", "loaded")
            ]

            loaded = client.post("/models/load", json={"model_id": "tiny-org/tiny-llama"})
            assert loaded.status_code == 200, loaded.text
            endpoint = client.get("/models/tiny-org%2Ftiny-llama/endpoint").json()
            assert endpoint == {"url": f"http://127.0.0.1:{port}"}
            assert {m["id"] for m in client.get("/models").json()} == {
                "tiny-org/tiny-qwen3",
                "tiny-org/tiny-llama",
            }
            unloaded = client.post("/models/unload", json={"model_id": "tiny-org/tiny-llama"})
            assert unloaded.json() == {"status": "unloaded", "model_id": "tiny-org/tiny-llama"}
            assert [m["id"] for m in client.get("/models").json()] == ["tiny-org/tiny-qwen3"]
            assert "neuron_models_loaded 1.0" in client.get("/metrics").text

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log_path.read_text()
    assert "model tiny-org/tiny-qwen3 unloaded" in output
    assert "shutdown complete" in output
