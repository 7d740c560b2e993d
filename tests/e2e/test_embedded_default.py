"""The README's first command, as a real process: `cortex serve` with no config serves the
embedded SmolLM2 through the gateway and a local neuron; the official SDK gets "Paris".
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.processes import free_port, read_ready_event

pytestmark = pytest.mark.slow

READY_TIMEOUT_SECS = 600


@dataclass
class Served:
    process: subprocess.Popen[str]
    ready: dict[str, Any]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "\nState:\tZ" not in status.read_text()


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.2)
    return False


def serve_command(api: int | str, metrics: int, neuron_port: str, *, as_json: bool = True) -> list[str]:
    """`cortex serve` on loopback ports; `neuron_port` "0": the local neuron takes a free one."""
    return [
        sys.executable, "-m", "cortex_cli", "serve", *(["--json"] if as_json else []),
        "--listen", f"127.0.0.1:{api}", "--metrics-listen", f"127.0.0.1:{metrics}", "--neuron-port", neuron_port,
    ]  # fmt: skip


def start_serve(smollm2_dir: Path, api: int, metrics: int) -> subprocess.Popen[str]:
    """`cortex serve --json` on the embedded default, its events on stdout; the cache is the
    one smollm2_dir converted into, so the start does not convert again."""
    return subprocess.Popen(
        serve_command(api, metrics, "0"),
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "CORTEX_CACHE_DIR": str(smollm2_dir.parent.parent)},
    )


@pytest.fixture(scope="module")
def served(smollm2_dir: Path) -> Iterator[Served]:
    # smollm2_dir: the conversion happens (once) in the fixture, so this start is fast.
    api, metrics = free_port(), free_port()
    process = start_serve(smollm2_dir, api, metrics)
    assert process.stdout is not None
    try:
        yield Served(process, read_ready_event(process.stdout, process, READY_TIMEOUT_SECS))
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_openai_sdk_gets_paris(served: Served) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=served.ready["api"] + "/v1", api_key="unused", timeout=300, max_retries=0)
    models = [model.id for model in client.models.list().data]
    assert served.ready["model"] in models
    answer = client.chat.completions.create(
        model=served.ready["model"],
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
    )
    assert "Paris" in (answer.choices[0].message.content or "")


def test_anthropic_sdk_gets_paris(served: Served) -> None:
    from anthropic import Anthropic

    client = Anthropic(base_url=served.ready["api"], api_key="unused", timeout=300, max_retries=0)
    message = client.messages.create(
        model=served.ready["model"],
        max_tokens=24,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    text = "".join(block.text for block in message.content if block.type == "text")
    assert "Paris" in text


def test_cortex_status_shows_the_local_node_and_model(served: Served) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cortex_cli", "status", "--endpoint", served.ready["api"]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "1/1 nodes healthy" in done.stdout
    assert any("local" in line and "healthy" in line for line in done.stdout.splitlines())
    assert any("smollm2-135m-instruct" in line and "loaded" in line for line in done.stdout.splitlines())


def test_metrics_listener_answers(served: Served) -> None:
    import urllib.request

    with urllib.request.urlopen(served.ready["metrics"] + "/metrics", timeout=10) as response:
        assert b"cortex_requests_total" in response.read()


def port_of(url: str) -> str:
    return url.rsplit(":", 1)[1]


@pytest.mark.parametrize("taken", ["--listen", "--neuron-port"])
def test_a_second_cortex_serve_beside_it_exits_1_in_one_line_and_leaves_it_serving(
    served: Served, taken: str
) -> None:
    # The second one asks for an address the first one holds: its API, or its neuron's port
    # (where an answer from the first one's neuron must not be taken for its own).
    api = port_of(served.ready["api"]) if taken == "--listen" else str(free_port())
    neuron = port_of(served.ready["neuron"]) if taken == "--neuron-port" else str(free_port())
    address = f"127.0.0.1:{api if taken == '--listen' else neuron}"
    second = subprocess.run(
        serve_command(api, free_port(), neuron, as_json=False),
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert second.returncode == 1
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert address in lines[0] and taken in lines[0]
    assert "cortex is ready" not in second.stdout
    from openai import OpenAI

    client = OpenAI(base_url=served.ready["api"] + "/v1", api_key="unused", timeout=300, max_retries=0)
    assert served.ready["model"] in [model.id for model in client.models.list().data]
    assert served.process.poll() is None


def test_stopping_cortex_stops_the_neuron(served: Served) -> None:
    # Last in this module: it ends the served process.
    neuron_pid = served.ready["neuron_pid"]
    assert pid_alive(neuron_pid)
    served.process.send_signal(signal.SIGINT)
    assert served.process.wait(timeout=120) == 0
    assert wait_gone(neuron_pid, 30)


def test_a_killed_cortex_takes_its_neuron_along(smollm2_dir: Path) -> None:
    # SIGKILL leaves no chance to clean up: the kernel's parent-death signal must do it.
    process = start_serve(smollm2_dir, free_port(), free_port())
    assert process.stdout is not None
    try:
        ready = read_ready_event(process.stdout, process, READY_TIMEOUT_SECS)
    finally:
        process.kill()
        process.wait()
    assert wait_gone(ready["neuron_pid"], 60)
