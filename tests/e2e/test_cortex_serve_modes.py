"""`cortex serve --model PATH` and `cortex serve --config cortex.toml` as real processes.

The README promises both: another model served the same way as the embedded default
(named after its folder), and the gateway alone in front of neurons from a config file.
Tiny checkpoints keep these fast; the embedded default has its own module.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
from support.processes import clean_env, free_port, neuron_serve, read_ready_event

pytestmark = pytest.mark.slow

CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "temperature": 0}


@contextmanager
def cortex_serve(*args: str) -> Iterator[dict[str, Any]]:
    api, metrics = free_port(), free_port()
    command = [
        sys.executable, "-m", "cortex_cli", "serve", "--json",
        "--listen", f"127.0.0.1:{api}", "--metrics-listen", f"127.0.0.1:{metrics}", *args,
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=clean_env())
    assert process.stdout is not None
    try:
        yield read_ready_event(process.stdout, process)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=90) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_model_from_a_folder_names_it_after_the_folder(tiny_qwen3: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_qwen3, tmp_path / "tiny-chat-model")
    with cortex_serve("--model", str(folder), "--neuron-port", "0") as ready:
        assert ready["model"] == "tiny-chat-model"
        with httpx2.Client(base_url=ready["api"], timeout=60) as client:
            listed = [entry["id"] for entry in client.get("/v1/models").json()["data"]]
            assert listed == ["tiny-chat-model"]
            answer = client.post("/v1/chat/completions", json={"model": "tiny-chat-model", **CHAT})
            assert answer.status_code == 200, answer.text
            assert answer.json()["model"] == "tiny-chat-model"


def test_serve_from_a_config_file_routes_to_its_neurons(tiny_llama: Path, tmp_path: Path) -> None:
    neuron_port = free_port()
    neuron_dir = tmp_path / "neuron"
    neuron_dir.mkdir()
    (neuron_dir / "neuron.toml").write_text(
        f'host = "127.0.0.1"\nport = {neuron_port}\n\n'
        f'[[default_models]]\nmodel_id = "{tiny_llama}"\nserved_model_name = "org/tiny-llama"\n'
    )
    (tmp_path / "models.toml").write_text(
        '[[models]]\nid = "org/tiny-llama"\n\n[aliases]\ntiny = "org/tiny-llama"\n'
    )
    (tmp_path / "cortex.toml").write_text(
        'models_config = "models.toml"\n\n'
        f'[[neurons]]\nname = "node-a"\nendpoint = "http://127.0.0.1:{neuron_port}"\n\n'
        "[poller]\ninterval_secs = 0.2\n"
    )
    with (
        neuron_serve(neuron_dir / "neuron.toml", neuron_port),
        cortex_serve("--config", str(tmp_path / "cortex.toml")) as ready,
    ):
        assert ready["neurons"] == ["node-a"]
        with httpx2.Client(base_url=ready["api"], timeout=60) as client:
            answer = client.post("/v1/chat/completions", json={"model": "tiny", **CHAT})
            assert answer.status_code == 200, answer.text
            fleet = client.get("/admin/fleet").json()
            [node] = fleet["nodes"]
            assert (node["name"], [m["id"] for m in node["models"]]) == ("node-a", ["org/tiny-llama"])
