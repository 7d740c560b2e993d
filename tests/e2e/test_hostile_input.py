"""Hostile and oversized input against real processes: `cortex serve --config` (the gateway)
in front of `neuron serve` (a tiny Llama), both on 127.0.0.1.

Every case asserts the status and the error's shape in the caller's dialect (OpenAI's
envelope, or Anthropic's on /v1/messages), and after it that a normal request still
answers: no input may take a node down. The processes are shared by the whole module;
its gateway reads bodies for at most BODY_TIMEOUT_SECS and buffers at most BUDGET_BYTES of
uploads in progress, so the slow-client cases end quickly. Waits are hang guards, never
speed checks.
"""

from __future__ import annotations

import json
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from support.processes import clean_env, free_port, neuron_serve, read_ready_event

pytestmark = pytest.mark.slow

MODEL = "org/tiny"
# The catalogue gives this model a limit of its own; other names fall back to the gateway's.
MODEL_MAX_MESSAGES = 100
BODY_TIMEOUT_SECS = 3
BUDGET_BYTES = 64 * 1024 * 1024
HANG_GUARD_SECS = 60.0
MiB = 1024 * 1024


@dataclass
class Fleet:
    gateway: str
    gateway_port: int
    gateway_pid: int
    neuron: str
    neuron_port: int


@pytest.fixture(scope="module")
def fleet(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    folder = tmp_path_factory.mktemp("hostile")
    neuron_port = free_port()
    (folder / "neuron.toml").write_text(
        f'host = "127.0.0.1"\nport = {neuron_port}\nbody_read_timeout_secs = {BODY_TIMEOUT_SECS}\n\n'
        f'[[default_models]]\nmodel_id = "{tiny_llama}"\nserved_model_name = "{MODEL}"\n'
    )
    (folder / "models.toml").write_text(f'[[models]]\nid = "{MODEL}"\nmax_messages = {MODEL_MAX_MESSAGES}\n')
    (folder / "cortex.toml").write_text(
        'models_config = "models.toml"\n\n'
        f"[gateway]\nbody_read_timeout_secs = {BODY_TIMEOUT_SECS}\nmax_buffered_bytes = {BUDGET_BYTES}\n\n"
        f'[[neurons]]\nname = "local"\nendpoint = "http://127.0.0.1:{neuron_port}"\n\n'
        "[poller]\ninterval_secs = 0.2\n"
    )
    api = free_port()
    command = [
        sys.executable, "-m", "cortex_cli", "serve", "--json", "--config", str(folder / "cortex.toml"),
        "--listen", f"127.0.0.1:{api}", "--metrics-listen", f"127.0.0.1:{free_port()}",
    ]  # fmt: skip
    with neuron_serve(folder / "neuron.toml", neuron_port):
        gateway = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=clean_env())
        assert gateway.stdout is not None
        try:
            ready = read_ready_event(gateway.stdout, gateway)
            fleet = Fleet(ready["api"], api, gateway.pid, f"http://127.0.0.1:{neuron_port}", neuron_port)
            with httpx2.Client(base_url=fleet.gateway, timeout=HANG_GUARD_SECS) as client:
                deadline = time.monotonic() + HANG_GUARD_SECS
                while client.post("/v1/chat/completions", json=chat()).status_code != 200:
                    assert time.monotonic() < deadline, "the gateway never routed to the neuron"
                    time.sleep(0.2)
            yield fleet
        finally:
            gateway.send_signal(signal.SIGTERM)
            assert gateway.wait(timeout=120) == 0


def chat(messages: int = 1, content: str = "Hello", model: str = MODEL, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}] * messages,
        "max_tokens": 2,
        **extra,
    }


def many_messages(count: int, model: str = MODEL) -> bytes:
    """`count` tiny messages, built as bytes (json.dumps of a million dicts takes seconds)."""
    one = b'{"role":"user","content":"x"}'
    return (
        b'{"model":"' + model.encode() + b'","max_tokens":2,"messages":[' + b",".join([one] * count) + b"]}"
    )


def still_serving(fleet: Fleet) -> None:
    """A normal request through the gateway still answers, and the neuron's health too."""
    with httpx2.Client(timeout=HANG_GUARD_SECS) as client:
        answer = client.post(fleet.gateway + "/v1/chat/completions", json=chat())
        assert answer.status_code == 200, answer.text
        assert client.get(fleet.neuron + "/health").status_code == 200


def openai_error(response: httpx2.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = response.json()["error"]
    assert isinstance(error["message"], str) and error["type"]
    if code is not None:
        assert error["code"] == code, error
    return error


def anthropic_error(response: httpx2.Response, status: int, kind: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["type"] == "error" and body["error"]["type"] == kind, body
    assert body["request_id"]
    return body["error"]  # type: ignore[no-any-return]


def post(base: str, path: str, content: bytes | None = None, **kwargs: Any) -> httpx2.Response:
    with httpx2.Client(timeout=HANG_GUARD_SECS) as client:
        headers = {"content-type": "application/json"}
        if path.startswith("/v1/messages"):
            headers["anthropic-version"] = "2023-06-01"
        return client.post(base + path, content=content, headers=headers, **kwargs)


# --- conversation size ---------------------------------------------------------------------


def test_a_million_messages_are_refused_at_the_gateway_naming_the_limit(fleet: Fleet) -> None:
    body = many_messages(1_000_000)
    assert len(body) < 32 * MiB  # under the body limit: it is the conversation that is refused
    error = openai_error(post(fleet.gateway, "/v1/chat/completions", body), 400, "too_many_messages")
    assert f"at most {MODEL_MAX_MESSAGES} (max_messages of {MODEL} in models.toml" in error["message"]
    other = openai_error(
        post(fleet.gateway, "/v1/chat/completions", many_messages(20_000, "org/not-listed")),
        400,
        "too_many_messages",
    )
    assert "gateway.max_messages in cortex.toml" in other["message"]
    anthropic = anthropic_error(post(fleet.gateway, "/v1/messages", body), 400, "invalid_request_error")
    assert "max_messages" in anthropic["message"]
    still_serving(fleet)


def test_a_neuron_answers_its_health_while_it_refuses_huge_conversations(fleet: Fleet) -> None:
    body = many_messages(1_000_000)
    answers: list[httpx2.Response] = []
    health_during: list[int] = []
    done = threading.Event()

    def hostile() -> None:
        with httpx2.Client(timeout=HANG_GUARD_SECS) as client:
            for _ in range(3):
                answers.append(
                    client.post(
                        fleet.neuron + "/v1/chat/completions",
                        content=body,
                        headers={"content-type": "application/json"},
                    )
                )
        done.set()

    sender = threading.Thread(target=hostile)
    sender.start()
    with httpx2.Client(timeout=HANG_GUARD_SECS) as client:
        while not done.is_set():
            status = client.get(fleet.neuron + "/health").status_code
            if not done.is_set():
                health_during.append(status)
    sender.join()
    for answer in answers:
        error = openai_error(answer, 400, "too_many_messages")
        assert "max_messages in neuron.toml" in error["message"]
    # Health answered while the huge requests were in flight, every time it was asked.
    assert health_during and set(health_during) == {200}
    still_serving(fleet)


def test_a_prompt_over_the_byte_limit_is_refused_at_both(fleet: Fleet) -> None:
    body = json.dumps(chat(content="x" * (9 * MiB))).encode()
    for base, where in ((fleet.gateway, "gateway.max_prompt_bytes"), (fleet.neuron, "max_prompt_bytes in")):
        error = openai_error(post(base, "/v1/chat/completions", body), 400, "prompt_too_large")
        assert where in error["message"]
    still_serving(fleet)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/v1/chat/count_tokens"])
def test_empty_messages_are_a_400_in_the_dialect(fleet: Fleet, path: str) -> None:
    body = json.dumps({"model": MODEL, "messages": [], "max_tokens": 2}).encode()
    if path == "/v1/messages":
        anthropic_error(post(fleet.gateway, path, body), 400, "invalid_request_error")
    elif path == "/v1/chat/count_tokens":
        openai_error(post(fleet.neuron, path, body), 400)
    else:
        openai_error(post(fleet.gateway, path, body), 400)
        openai_error(post(fleet.neuron, path, body), 400)
    still_serving(fleet)


# --- JSON nesting ----------------------------------------------------------------------------

DEEP = b'{"model":"org/tiny","messages":[{"role":"user","content":' + b"[" * 1000 + b"]" * 1000 + b"}]}"
GATEWAY_ROUTES = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/admin/models/load",
]
NEURON_ROUTES = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/chat/count_tokens",
    "/models/load",
]


@pytest.mark.parametrize("path", GATEWAY_ROUTES)
def test_deep_json_is_a_400_in_the_dialect_at_the_gateway(fleet: Fleet, path: str) -> None:
    response = post(fleet.gateway, path, DEEP)
    if path.startswith("/v1/messages"):
        assert "nests JSON deeper" in anthropic_error(response, 400, "invalid_request_error")["message"]
    else:
        openai_error(response, 400, "json_too_deep")
    still_serving(fleet)


@pytest.mark.parametrize("path", NEURON_ROUTES)
def test_deep_json_is_a_400_at_the_neuron(fleet: Fleet, path: str) -> None:
    openai_error(post(fleet.neuron, path, DEEP), 400, "json_too_deep")
    still_serving(fleet)


# --- body size, slow clients ----------------------------------------------------------------


def test_a_body_over_the_limit_is_413_in_the_dialect(fleet: Fleet) -> None:
    body = b" " * (33 * MiB)
    openai_error(post(fleet.gateway, "/v1/chat/completions", body), 413, "request_too_large")
    anthropic_error(post(fleet.gateway, "/v1/messages", body), 413, "request_too_large")
    still_serving(fleet)


def open_upload(port: int, path: str, declared: int, anthropic: bool = False) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD_SECS)
    head = (
        f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"content-length: {declared}\r\n"
        + ("anthropic-version: 2023-06-01\r\n" if anthropic else "")
        + "\r\n"
    )
    sock.sendall(head.encode())
    return sock


def send_part(sock: socket.socket, size: int) -> None:
    """Send `size` bytes of the body, or fewer if the server answers (refuses) first."""
    chunk = b" " * (64 * 1024)
    sent = 0
    while sent < size:
        readable, writable, _ = select.select([sock], [sock], [], HANG_GUARD_SECS)
        assert readable or writable, "the server neither read nor answered"
        if readable:
            return
        sent += sock.send(chunk[: size - sent])


def read_answer(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        assert part, f"connection closed without an answer: {data!r}"
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        part = sock.recv(65536)
        assert part, "connection closed mid-answer"
        body += part
    return status, json.loads(body[:length])


def test_stalled_uploads_are_408_in_the_dialect(fleet: Fleet) -> None:
    # All three at once: each waits out the same read timeout.
    targets = {
        "gateway": open_upload(fleet.gateway_port, "/v1/chat/completions", MiB),
        "gateway-anthropic": open_upload(fleet.gateway_port, "/v1/messages", MiB, anthropic=True),
        "neuron": open_upload(fleet.neuron_port, "/v1/chat/completions", MiB),
    }
    try:
        for sock in targets.values():
            send_part(sock, 1000)
        answers = {target: read_answer(sock) for target, sock in targets.items()}
    finally:
        for sock in targets.values():
            sock.close()
    for target, (status, body) in answers.items():
        assert status == 408, (target, body)
        if target == "gateway-anthropic":
            assert body["type"] == "error" and "body_read_timeout_secs" in body["error"]["message"]
        else:
            assert body["error"]["code"] == "request_timeout"
            assert "body_read_timeout_secs" in body["error"]["message"]
    still_serving(fleet)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD_SECS
    while not check():
        assert time.monotonic() < deadline, f"not within {HANG_GUARD_SECS:g} s: {what}"
        time.sleep(0.2)


def test_twenty_stalled_uploads_hold_bounded_memory_and_release_it(fleet: Fleet) -> None:
    """The bound: twenty uploads of 30 MB that stall after 8 MiB each raise the gateway's RSS
    by at most its upload budget (max_buffered_bytes, 64 MiB here) plus 32 MiB of
    connection buffers; past the budget they are refused at once (503 + Retry-After, in
    the dialect); after the read timeout the held ones get 408, and RSS returns to within
    16 MiB of where it was before."""
    still_serving(fleet)
    baseline = rss_bytes(fleet.gateway_pid)
    uploads = [open_upload(fleet.gateway_port, "/v1/chat/completions", 30_000_000) for _ in range(20)]
    try:
        for sock in uploads:
            send_part(sock, 8 * MiB)
        held = rss_bytes(fleet.gateway_pid) - baseline
        assert held <= BUDGET_BYTES + 32 * MiB, f"{held / MiB:.0f} MiB held by stalled uploads"
        answers = [read_answer(sock) for sock in uploads]
    finally:
        for sock in uploads:
            sock.close()
    statuses = sorted(status for status, _ in answers)
    assert set(statuses) == {408, 503}, statuses
    assert statuses.count(408) <= BUDGET_BYTES // (8 * MiB)
    for status, body in answers:
        assert body["error"]["code"] == {408: "request_timeout", 503: "server_busy"}[status]
    eventually(
        lambda: rss_bytes(fleet.gateway_pid) <= baseline + 16 * MiB,
        f"the gateway's RSS back to its baseline of {baseline / MiB:.0f} MiB",
    )
    still_serving(fleet)


# --- model sources --------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/etc", "../../etc/passwd", "/tmp/../etc/passwd"])
def test_loading_a_path_outside_the_roots_is_refused_and_nothing_is_listed(fleet: Fleet, path: str) -> None:
    direct = openai_error(post(fleet.neuron, "/models/load", json.dumps({"model_id": path}).encode()), 403)
    assert direct["code"] == "model_path_forbidden" and "model_roots" in direct["message"]
    through = post(fleet.gateway, "/admin/models/load", json.dumps({"model": path}).encode())
    assert through.status_code >= 400
    with httpx2.Client(timeout=HANG_GUARD_SECS) as client:
        exposed = [
            through.text,
            client.get(fleet.neuron + "/health").text,
            client.get(fleet.neuron + "/models").text,
            client.get(fleet.gateway + "/health").text,
            client.get(fleet.gateway + "/admin/fleet").text,
        ]
    for text in exposed:
        # Names a listing of /etc would hold (`hostname` is a field of /health, so not that).
        for listed in ("passwd", "os-release", "resolv.conf", "shadow"):
            assert listed not in text.replace(path, ""), text
    still_serving(fleet)


# --- names echoed ---------------------------------------------------------------------------


def test_a_huge_model_name_is_not_echoed_whole(fleet: Fleet) -> None:
    name = "org/" + "x" * 100_000
    body = json.dumps(chat(model=name)).encode()
    gateway = openai_error(post(fleet.gateway, "/v1/chat/completions", body), 404, "model_not_found")
    neuron = openai_error(post(fleet.neuron, "/v1/chat/completions", body), 404, "model_not_found")
    anthropic = anthropic_error(post(fleet.gateway, "/v1/messages", body), 404, "not_found_error")
    with httpx2.Client(timeout=HANG_GUARD_SECS) as client:
        # A URL holds at most 64 KiB (the client's limit), still far over the echo limit.
        retrieved = openai_error(client.get(f"{fleet.gateway}/v1/models/{name[:30_000]}"), 404)
    for error in (gateway, neuron, anthropic, retrieved):
        assert len(json.dumps(error)) < 2000
        assert "more characters" in error["message"]
    still_serving(fleet)


# --- the bad input covered elsewhere, here against real processes ----------------------------


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"", "malformed_json"),
        (b"{not json", "malformed_json"),
        (b"[1, 2, 3]", None),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "missing_model_field"),
        (b'{"model": 7, "messages": []}', "missing_model_field"),
        (b'{"model": "org/tiny", "messages": [{"role": "user", "content": 5}]}', None),
        (b'{"model": "org/tiny", "messages": "hi"}', None),
    ],
)
def test_malformed_bodies_are_400s_in_both_dialects(fleet: Fleet, body: bytes, code: str | None) -> None:
    openai_error(post(fleet.gateway, "/v1/chat/completions", body), 400, code)
    anthropic_error(post(fleet.gateway, "/v1/messages", body), 400, "invalid_request_error")
    openai_error(post(fleet.neuron, "/v1/chat/completions", body), 400)
    still_serving(fleet)
