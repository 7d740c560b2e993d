"""Real processes on loopback for end-to-end tests: start, wait until ready, stop, keep the log."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx2

STARTUP_TIMEOUT_SECS = 180.0


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


def clean_env(**overrides: str) -> dict[str, str]:
    """This environment without our config overrides (a developer's NEURON_PORT must not leak in)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("NEURON_", "CORTEX_")) and key != "HF_HUB_CACHE"
    }
    env["HF_HUB_OFFLINE"] = "1"
    env.update(overrides)
    return env


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, check: Callable[[], bool], what: str, timeout: float = STARTUP_TIMEOUT_SECS) -> None:
        """Poll `check` until it holds; connection errors mean 'not yet'; an exit fails at once."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited before {what}:\n{self.output()[-4000:]}")
            with contextlib.suppress(httpx2.TransportError):
                if check():
                    return
            time.sleep(0.2)
        raise AssertionError(f"{self.name}: no {what} within {timeout:.0f} s:\n{self.output()[-4000:]}")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start(name: str, command: list[str], log: Path, env: dict[str, str]) -> Service:
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    return Service(name, process, log)


@contextlib.contextmanager
def neuron_serve(config: Path, port: int, env: dict[str, str] | None = None) -> Iterator[Service]:
    """`neuron serve --config`, ready once its default models are activated; stopped afterwards."""
    service = start(
        "neuron",
        [*neuron_command(), "serve", "--config", str(config)],
        config.parent / "neuron.log",
        env or clean_env(),
    )
    try:
        with httpx2.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            service.wait_for(
                lambda: client.get("/health").json()["activation"]["state"] == "ready", "ready /health"
            )
        yield service
    finally:
        service.stop()


# The gateway as a process of its own, over a cortex.toml (its INFO log is what the request-id
# test reads).
GATEWAY_MAIN = """
import logging, sys
from pathlib import Path
from cortex_core.config.catalogue import load_catalogue
from cortex_core.config.gateway import load_gateway_config
from cortex_gateway.serve import run_gateway
logging.basicConfig(level=logging.INFO)
config = load_gateway_config(Path(sys.argv[1]))
run_gateway(config, load_catalogue(Path(config.models_config)))
"""


@dataclass
class Fleet:
    """A gateway process in front of one `neuron serve` process, on loopback."""

    gateway_url: str
    model_id: str
    gateway: Service
    neuron: Service


@contextlib.contextmanager
def local_fleet(work: Path, model_id: str, aliases: dict[str, str] | None = None) -> Iterator[Fleet]:
    """`neuron serve` with `model_id` as its default model and a gateway in front of it (its
    catalogue: that model and `aliases`), configured in `work`; yielded once the gateway lists
    the model as loaded, both processes stopped afterwards."""
    neuron_port, api_port, metrics_port = free_port(), free_port(), free_port()
    (work / "neuron.toml").write_text(
        f'host = "127.0.0.1"\nport = {neuron_port}\ndrain_timeout_secs = 5\n\n'
        f"[[default_models]]\nmodel_id = {model_id!r}\n"
    )
    models = f"[[models]]\nid = {model_id!r}\n"
    if aliases:
        models += "\n[aliases]\n" + "".join(f"{alias} = {target!r}\n" for alias, target in aliases.items())
    (work / "models.toml").write_text(models)
    (work / "cortex.toml").write_text(
        f'models_config = "{work / "models.toml"}"\n\n'
        f'[gateway]\nlisten = "127.0.0.1:{api_port}"\nmetrics_listen = "127.0.0.1:{metrics_port}"\n\n'
        f'[[neurons]]\nname = "local"\nendpoint = "http://127.0.0.1:{neuron_port}"\n\n'
        "[poller]\ninterval_secs = 0.2\n"
    )
    with neuron_serve(work / "neuron.toml", neuron_port) as neuron:
        gateway = start(
            "gateway",
            [sys.executable, "-c", GATEWAY_MAIN, str(work / "cortex.toml")],
            work / "gateway.log",
            clean_env(),
        )
        try:
            gateway_url = f"http://127.0.0.1:{api_port}"
            with httpx2.Client(base_url=gateway_url, timeout=30) as client:

                def model_loaded() -> bool:
                    # `loaded` is a field every entry has (a KeyError if that ever changes);
                    # the catalogue lists the model before it is loaded, so being listed
                    # alone proves nothing.
                    models = client.get("/v1/models").json()["data"]
                    return any(m["id"] == model_id and m["loaded"] for m in models)

                gateway.wait_for(model_loaded, "the model loaded in /v1/models")
            yield Fleet(gateway_url, model_id, gateway, neuron)
        finally:
            gateway.stop()


def read_ready_event(
    stdout: IO[str], process: subprocess.Popen[str], timeout: float = STARTUP_TIMEOUT_SECS
) -> dict[str, Any]:
    """The `{"event": "ready", ...}` line `cortex serve --json` prints once it can serve."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stdout.readline()
        if not line:
            raise AssertionError(f"cortex serve exited with {process.wait()} before it was ready")
        if line.startswith("{"):
            event: dict[str, Any] = json.loads(line)
            if event.get("event") == "ready":
                return event
    raise AssertionError("cortex serve was not ready in time")


def tp_worker_pids() -> list[int]:
    """Live `neuron.tp.worker` children of this (test) process, zombies excluded."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if b"neuron.tp.worker" in cmdline and int(fields[1]) == os.getpid() and fields[0] != "Z":
            found.append(int(entry))
    return found
