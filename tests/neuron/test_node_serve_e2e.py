"""The real `neuron serve` process on loopback, as docs/neuron.md tells a new user to run it."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Any

import httpx2
import pytest
from support.fake_hf_cache import add_to_hf_cache
from support.processes import clean_env, free_port, neuron_command, start

pytestmark = pytest.mark.slow


def write_config(folder: Path, port: int, drain_secs: float, model_id: str) -> Path:
    config = folder / "neuron.toml"
    config.write_text(
        f'host = "127.0.0.1"\nport = {port}\ndrain_timeout_secs = {drain_secs}\n\n'
        f"[[default_models]]\nmodel_id = {json.dumps(model_id)}\n"
    )
    return config


def test_neuron_serve_loads_from_the_hf_cache_and_exits_cleanly_on_sigterm(
    tmp_path: Path, tiny_qwen3: Path, tiny_llama: Path
) -> None:
    hf_home = tmp_path / "hf-home"
    add_to_hf_cache(hf_home / "hub", "tiny-org/tiny-qwen3", tiny_qwen3)
    add_to_hf_cache(hf_home / "hub", "tiny-org/tiny-llama", tiny_llama)
    port = free_port()
    config = write_config(tmp_path, port, 5, "tiny-org/tiny-qwen3")
    neuron = start(
        "neuron",
        [*neuron_command(), "serve", "--config", str(config)],
        tmp_path / "neuron.log",
        clean_env(HF_HOME=str(hf_home)),
    )
    try:
        with httpx2.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            neuron.wait_for(lambda: client.get("/health").json()["activation"]["state"] == "ready", "ready")
            health = client.get("/health").json()
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
        assert neuron.stop() == 0
    finally:
        neuron.stop()
    output = neuron.output()
    assert "model tiny-org/tiny-qwen3 unloaded" in output
    assert "shutdown complete" in output


def test_sigterm_lets_an_in_flight_stream_finish_then_exits_0(tmp_path: Path, tiny_qwen3: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, port, 60, str(tiny_qwen3))
    neuron = start(
        "neuron", [*neuron_command(), "serve", "--config", str(config)], tmp_path / "neuron.log", clean_env()
    )
    first_chunk = threading.Event()
    frames: list[str] = []

    def stream() -> None:
        body = {
            "model": str(tiny_qwen3),
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 400,
            "temperature": 0,
            "stream": True,
        }
        with (
            httpx2.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client,
            client.stream("POST", "/v1/chat/completions", json=body) as response,
        ):
            for line in response.iter_lines():
                if line.startswith("data: "):
                    frames.append(line[6:])
                    first_chunk.set()

    try:
        with httpx2.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            neuron.wait_for(lambda: client.get("/health").json()["activation"]["state"] == "ready", "ready")
        reader = threading.Thread(target=stream)
        reader.start()
        assert first_chunk.wait(60), neuron.output()[-3000:]
        neuron.process.send_signal(signal.SIGTERM)
        reader.join(120)
        assert not reader.is_alive()
        assert neuron.process.wait(timeout=60) == 0
    finally:
        neuron.stop()
    # The stream that was running when the signal came ended normally, not cut off.
    assert len(frames) > 3 and frames[-1] == "[DONE]", frames[-3:]
    finish = [
        json.loads(frame)["choices"][0]["finish_reason"]
        for frame in frames[:-1]
        if json.loads(frame)["choices"]
    ]
    assert finish[-1] in ("length", "stop")
    assert "draining in-flight requests" in neuron.output()
    assert "shutdown complete" in neuron.output()


def test_a_hybrid_qwen3_5_checkpoint_serves_through_the_openai_sdk(
    tmp_path: Path, tiny_qwen3_5: Path
) -> None:
    """The seeds' Qwen3.5/3.6 family (Gated DeltaNet + full attention, saved inside a vision
    model) loads from a folder and answers, streaming and not; /models reports its context."""
    import openai

    port = free_port()
    config = write_config(tmp_path, port, 5, str(tiny_qwen3_5))
    neuron = start(
        "neuron", [*neuron_command(), "serve", "--config", str(config)], tmp_path / "neuron.log", clean_env()
    )
    try:
        with httpx2.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            neuron.wait_for(lambda: client.get("/health").json()["activation"]["state"] == "ready", "ready")
            (info,) = client.get("/models").json()
            (load,) = client.get("/health").json()["models"]
        assert info["status"] == "loaded", info
        assert info["limit"]["context"] == load["max_model_len"] > 0
        sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        messages: list[Any] = [{"role": "user", "content": "The capital of France is"}]
        answer = sdk.chat.completions.create(
            model=str(tiny_qwen3_5), messages=messages, max_tokens=12, temperature=0
        )
        assert answer.usage is not None and answer.usage.completion_tokens > 0
        streamed = sdk.chat.completions.create(
            model=str(tiny_qwen3_5), messages=messages, max_tokens=12, temperature=0, stream=True
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
        assert text == (answer.choices[0].message.content or "")
    finally:
        neuron.stop()
