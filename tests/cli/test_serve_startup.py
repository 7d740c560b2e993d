"""`cortex serve` start-up truth, without models: a taken address is refused in one line
naming the flag that moves it, and a neuron that is not our child is never adopted."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from cortex_cli.client import CliError
from cortex_cli.serve import LocalModel, bind_gateway, free_port, port_in_use, wait_for_neuron_model
from cortex_core.config.gateway import load_gateway_config
from cortex_gateway import serve as gateway_serve


@contextmanager
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


def test_a_taken_api_or_metrics_address_names_its_flag() -> None:
    with taken_port() as port:
        for key, flag in (("LISTEN", "--listen"), ("METRICS_LISTEN", "--metrics-listen")):
            # The other listener on a free port, not the default one (which may be in use here).
            env = {
                "CORTEX_GATEWAY__LISTEN": f"127.0.0.1:{free_port()}",
                "CORTEX_GATEWAY__METRICS_LISTEN": f"127.0.0.1:{free_port()}",
            }
            env[f"CORTEX_GATEWAY__{key}"] = f"127.0.0.1:{port}"
            config = load_gateway_config(None, env=env)
            with pytest.raises(CliError) as refused:
                bind_gateway(gateway_serve, config)
            message = str(refused.value)
            assert f"127.0.0.1:{port}" in message and flag in message and "\n" not in message


def test_port_in_use_says_why() -> None:
    with taken_port() as port:
        assert port_in_use("127.0.0.1", port)
    assert port_in_use("127.0.0.1", port) is None


@contextmanager
def foreign_neuron(pid: int) -> Iterator[str]:
    """A neuron-like server whose /version names another process, with the model loaded."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            answer: Any = {"name": "neuron", "version": "0", "python": "3", "pid": pid}
            if self.path == "/models":
                answer = [{"id": "tiny", "status": "loaded"}]
            body = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def child() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


async def test_a_neuron_answering_with_another_pid_is_never_adopted() -> None:
    process = child()
    try:
        with foreign_neuron(pid=process.pid + 1) as url, pytest.raises(CliError) as refused:
            await wait_for_neuron_model(url, LocalModel("/m", "tiny"), process, asyncio.Event())
        assert "another process" in str(refused.value) and "--neuron-port" in str(refused.value)
    finally:
        process.kill()
        process.wait()


async def test_our_own_child_is_adopted_once_its_model_is_loaded() -> None:
    process = child()
    try:
        with foreign_neuron(pid=process.pid) as url:
            assert await wait_for_neuron_model(url, LocalModel("/m", "tiny"), process, asyncio.Event())
    finally:
        process.kill()
        process.wait()
