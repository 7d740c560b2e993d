"""The `cortex` command: help, version, status and models against a loopback fake gateway."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from click.testing import CliRunner

from cortex_cli import __version__
from cortex_cli.main import main
from cortex_cli.table import ago, memory, render_table

NOW = 1_800_000_000.0

FLEET: dict[str, Any] = {
    "status": "impaired",
    "generated_at": NOW,
    "nodes": [
        {
            "name": "gpu1",
            "endpoint": "http://gpu1:13131",
            "healthy": True,
            "last_poll": NOW - 2,
            "devices": [
                {"index": 0, "name": "NVIDIA RTX 4090", "total_mb": 24564, "free_mb": 12282, "temp_c": 61},
                {
                    "index": 1,
                    "name": "NVIDIA RTX 4090",
                    "total_mb": 24564,
                    "free_mb": 24564,
                    "utilization_pct": 7,
                },
            ],
            "models": [
                {
                    "id": "Qwen/Qwen3-8B",
                    "status": "loaded",
                    "in_flight": 1,
                    "neuron_in_flight": 3,
                    "queue_depth": 2,
                    "memory_mb": 17408,
                    "pinned": True,
                    "last_used": NOW - 75,
                },
                {"id": "meta-llama/Llama-3.1-8B-Instruct", "status": "loading"},
            ],
        },
        {
            "name": "cpu-box",
            "endpoint": "http://cpu-box:13131",
            "healthy": False,
            "last_error": "connection refused",
            "cpu_only": True,
            "host_memory_total_mb": 32768,
            "host_memory_free_mb": 16384,
            "models": [{"id": "org/broken", "status": "failed", "error": "unsupported model_type 'mamba'"}],
        },
    ],
}

MODELS: dict[str, Any] = {
    "object": "list",
    "data": [
        {
            "id": "Qwen/Qwen3-8B",
            "loaded": True,
            "feasible_on": ["gpu1"],
            "locations": [{"node": "gpu1", "status": "loaded"}],
        },
        {"id": "org/cold", "loaded": False, "feasible_on": ["gpu1"], "locations": []},
    ],
}


class FakeGateway(BaseHTTPRequestHandler):
    """Answers like the gateway's admin routes; records what it was sent."""

    received: ClassVar[list[tuple[str, Any]]] = []
    authorizations: ClassVar[list[str | None]] = []

    def _reply(self, status: int, body: Any) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        self.authorizations.append(self.headers.get("authorization"))
        if self.path == "/admin/fleet":
            self._reply(200, FLEET)
        elif self.path == "/v1/models":
            self._reply(200, MODELS)
        else:
            self._reply(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.received.append((self.path, body))
        self.authorizations.append(self.headers.get("authorization"))
        if body.get("model") == "org/unknown":
            self._reply(
                404, {"error": {"message": "model 'org/unknown' is not in the catalogue", "type": "x"}}
            )
        elif self.path == "/admin/models/load":
            self._reply(200, {"status": "loaded", "model": body["model"], "node": "gpu1"})
        else:
            self._reply(200, {"status": "unloaded", "model": body["model"], "nodes": ["gpu1"]})

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass


@pytest.fixture
def gateway_url() -> Iterator[str]:
    FakeGateway.received = []
    FakeGateway.authorizations = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeGateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# ---- help and version ------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--help"],
        ["serve", "--help"],
        ["status", "--help"],
        ["models", "--help"],
        ["models", "load", "-h"],
    ],
)
def test_help_reads_well(args: list[str]) -> None:
    result = invoke(*args) if args else CliRunner().invoke(main, [])
    assert result.exit_code in (0, 2)
    assert "Usage: " in result.output
    assert "Traceback" not in result.output


def test_top_level_help_names_every_command() -> None:
    output = invoke("--help").output
    for command in ("serve", "status", "models", "version"):
        assert command in output
    assert "127.0.0.1:31313" in output


def test_version_text_and_json() -> None:
    assert invoke("--version").output.strip() == f"cortex {__version__}"
    text = invoke("version").output
    assert text.startswith(f"cortex {__version__}") and "cortex-gateway" in text
    info = json.loads(invoke("version", "--json").output)
    assert info["cortex"] == __version__
    assert info["packages"]["cortex-cli"] == __version__


def test_serve_refuses_model_with_config(tmp_path: Any) -> None:
    config = tmp_path / "cortex.toml"
    config.write_text("")
    result = CliRunner().invoke(main, ["serve", "--config", str(config), "--model", "org/x"])
    assert result.exit_code == 2
    assert "--model" in result.output


# ---- status ----------------------------------------------------------------------------


def test_status_table_shows_nodes_devices_and_models(gateway_url: str) -> None:
    result = invoke("status", "--endpoint", gateway_url)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "(impaired): 1/2 nodes healthy" in out
    lines = out.splitlines()

    def line_with(*needles: str) -> str:
        found = [line for line in lines if all(n in line for n in needles)]
        assert found, f"no line with {needles} in:\n{out}"
        return found[0]

    line_with("gpu1", "http://gpu1:13131", "healthy", "2s ago")
    line_with("cpu-box", "UNHEALTHY (connection refused)")
    line_with("gpu1", "0 NVIDIA RTX 4090", "12.0 / 24.0 GiB (50%)", "61°C")
    line_with("gpu1", "1 NVIDIA RTX 4090", "0.0 / 24.0 GiB (0%)", "7%")
    line_with("cpu-box", "cpu (host memory)", "16.0 / 32.0 GiB (50%)")
    line_with("Qwen/Qwen3-8B", "loaded (pinned)", "gpu1", "17.0 GiB", "3 (+2 queued)", "1m ago")
    line_with("meta-llama/Llama-3.1-8B-Instruct", "loading", "gpu1")
    line_with("org/broken", "failed: unsupported model_type 'mamba'", "cpu-box")
    # Columns line up: every model row starts its STATE column at the same offset.
    header = line_with("MODEL", "STATE", "NODE", "IN-FLIGHT", "LAST USE")
    assert line_with("Qwen/Qwen3-8B").index("loaded") == header.index("STATE")


def test_status_json_is_the_gateway_answer(gateway_url: str) -> None:
    result = invoke("status", "--endpoint", gateway_url, "--json")
    assert json.loads(result.output) == FLEET


def test_status_endpoint_from_environment(gateway_url: str) -> None:
    result = CliRunner().invoke(main, ["status"], env={"CORTEX_ENDPOINT": gateway_url})
    assert result.exit_code == 0 and "gpu1" in result.output


def test_status_and_models_send_the_api_key_from_the_environment(gateway_url: str) -> None:
    env = {"CORTEX_ENDPOINT": gateway_url, "CORTEX_API_KEY": "cx-12345678-secret"}
    for args in (["status"], ["models", "list"], ["models", "load", "Qwen/Qwen3-8B"]):
        assert CliRunner().invoke(main, args, env=env).exit_code == 0
    assert (
        CliRunner()
        .invoke(main, ["status"], env={"CORTEX_ENDPOINT": gateway_url, "CORTEX_API_KEY": ""})
        .exit_code
        == 0
    )
    assert FakeGateway.authorizations == ["Bearer cx-12345678-secret"] * 3 + [None]


def test_status_against_nothing_is_one_line_and_exit_1(closed_port_url: str) -> None:
    # A real process: what a person sees in a terminal, stdout and stderr apart.
    done = subprocess.run(
        [sys.executable, "-m", "cortex_cli", "status", "--endpoint", closed_port_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith(
        f"cortex: cannot reach the gateway at {closed_port_url}: connection refused"
    )


def test_status_against_a_server_without_the_admin_route(gateway_url: str) -> None:
    result = CliRunner().invoke(main, ["status", "--endpoint", gateway_url + "/nothing-here"])
    assert result.exit_code == 1
    assert "HTTP 404" in result.output and "no route" in result.output


# ---- models ----------------------------------------------------------------------------


def test_models_list_table_and_json(gateway_url: str) -> None:
    out = invoke("models", "list", "-e", gateway_url).output
    assert any(
        "Qwen/Qwen3-8B" in line and "yes" in line and "gpu1(loaded)" in line for line in out.splitlines()
    )
    assert any("org/cold" in line and "can load on gpu1" in line for line in out.splitlines())
    assert json.loads(invoke("models", "list", "-e", gateway_url, "--json").output) == MODELS


def test_models_load_and_unload_post_to_admin_routes(gateway_url: str) -> None:
    assert invoke("models", "load", "Qwen/Qwen3-8B", "--node", "gpu1", "-e", gateway_url).output == (
        "Qwen/Qwen3-8B: loaded on gpu1\n"
    )
    unloaded = json.loads(invoke("models", "unload", "Qwen/Qwen3-8B", "-e", gateway_url, "--json").output)
    assert unloaded["status"] == "unloaded"
    assert FakeGateway.received == [
        ("/admin/models/load", {"model": "Qwen/Qwen3-8B", "node": "gpu1"}),
        ("/admin/models/unload", {"model": "Qwen/Qwen3-8B"}),
    ]


def test_models_load_error_carries_the_gateway_message(gateway_url: str) -> None:
    result = CliRunner().invoke(main, ["models", "load", "org/unknown", "-e", gateway_url])
    assert result.exit_code == 1
    assert "HTTP 404: model 'org/unknown' is not in the catalogue" in result.output


# ---- formatting helpers (table-driven) -------------------------------------------------


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        (None, "-"),
        (NOW, "0s ago"),
        (NOW - 59, "59s ago"),
        (NOW - 60, "1m ago"),
        (NOW - 7200, "2h ago"),
        (NOW - 3 * 86400, "3d ago"),
        (NOW + 5, "0s ago"),
    ],
)
def test_ago(timestamp: float | None, expected: str) -> None:
    assert ago(timestamp, NOW) == expected


@pytest.mark.parametrize(
    ("used", "total", "expected"),
    [
        (1024, 4096, "1.0 / 4.0 GiB (25%)"),
        (None, 4096, "? / 4.0 GiB"),
        (512, None, "0.5 GiB used"),
        (None, None, "-"),
    ],
)
def test_memory(used: int | None, total: int | None, expected: str) -> None:
    assert memory(used, total) == expected


def test_render_table_aligns_columns() -> None:
    assert render_table(["A", "BB"], [["xxx", "y"], ["z", "w"]]).splitlines() == [
        "  A    BB",
        "  xxx  y",
        "  z    w",
    ]


# ---- start-up cost ---------------------------------------------------------------------

HEAVY = ("torch", "transformers", "openai", "anthropic", "aiohttp", "cortex_gateway", "neuron", "starlette")


def test_status_never_imports_torch_or_the_sdks(gateway_url: str) -> None:
    code = (
        "import sys\n"
        "from cortex_cli.main import main\n"
        "try:\n"
        "    main(['status', '--endpoint', sys.argv[1]])\n"
        "except SystemExit:\n"
        "    pass\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, gateway_url], capture_output=True, text=True, timeout=60
    )
    assert "gpu1" in done.stdout, done.stderr
    assert "HEAVY []" in done.stdout


def test_import_time_of_the_cli_is_small() -> None:
    # -X importtime lists every module imported; assert on *what* is imported, not on time.
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import cortex_cli.main, cortex_cli.status"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert imported, done.stderr
    assert not imported & set(HEAVY)
