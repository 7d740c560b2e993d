"""SIGTERM with streams in flight, as real processes: the gateway (`cortex serve --config`)
in front of a scripted neuron process, and a neuron serving SmolLM2.

A short stream running when the signal arrives finishes normally (`[DONE]`,
`message_stop`); a long one is still running when the grace is over and ends with an
error event in its dialect, never a cut connection; the process exits 0. At the gateway
the scripted upstream decides which stream ends when. At the neuron the long streams are
long by their prompts, not by what the model answers (it may stop whenever it likes):
5000 tokens prefilled 4 a step are over a thousand steps, far more than ten seconds of grace
on a CPU, while the short stream was admitted first and decodes a token every step.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest
from support.processes import clean_env, free_port, neuron_serve, read_ready_event, start

pytestmark = pytest.mark.slow

MODEL = "smollm2"
FAKE_NEURON = Path(__file__).resolve().parents[1] / "support" / "fake_neuron_process.py"
GATEWAY_GRACE_SECS = 2
GRACE_SECS = 10
HANG_GUARD_SECS = 120.0
SHORT = "Say hi."
# About 5000 tokens: with PREFILL_CHUNK prompt tokens a step, far more steps than the grace
# holds on a CPU, whatever the model would answer.
LONG_PROMPT = "hello " * 5000
PREFILL_CHUNK = 4


@dataclass
class Stream:
    """One streaming request in a thread: its whole body, and when its first bytes came."""

    url: str
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    started: threading.Event = field(default_factory=threading.Event)
    # Set at the first data frame (a keep-alive comment sets only `started`).
    answering: threading.Event = field(default_factory=threading.Event)
    text: str = ""
    status: int = 0
    thread: threading.Thread | None = None

    def start(self) -> Stream:
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        return self

    def _run(self) -> None:
        with (
            httpx2.Client(timeout=HANG_GUARD_SECS) as client,
            client.stream("POST", self.url, json=self.body, headers=self.headers) as response,
        ):
            self.status = response.status_code
            for chunk in response.iter_text():
                self.text += chunk
                self.started.set()
                if "data:" in self.text:
                    self.answering.set()
        self.started.set()
        self.answering.set()

    def finish(self) -> str:
        assert self.thread is not None
        self.thread.join(HANG_GUARD_SECS)
        assert not self.thread.is_alive(), "the stream never ended"
        return self.text


def frames(text: str) -> list[tuple[str | None, str]]:
    """(event name, data) of each SSE frame; comments skipped."""
    found = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        event, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            found.append((event, "\n".join(data)))
    return found


def chat(content: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }


def message(content: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": True,
    }


def assert_openai_done(text: str) -> None:
    assert frames(text)[-1] == (None, "[DONE]"), text[-500:]


def assert_openai_cut_with_error(text: str) -> None:
    last = frames(text)[-1]
    assert last[0] is None and last[1] != "[DONE]", text[-500:]
    assert json.loads(last[1])["error"]["code"] == "shutting_down"
    assert "[DONE]" not in text


def write_neuron_config(folder: Path, model: Path, port: int, drain_secs: float) -> Path:
    config = folder / "neuron.toml"
    config.write_text(
        f'host = "127.0.0.1"\nport = {port}\ndrain_timeout_secs = {drain_secs}\n\n'
        f"[engine]\nprefill_chunk_tokens = {PREFILL_CHUNK}\nkeepalive_secs = 0.2\n\n"
        f'[[default_models]]\nmodel_id = "{model}"\nserved_model_name = "{MODEL}"\n'
    )
    return config


@pytest.fixture
def smollm2_neuron(smollm2_dir: Path, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    config = write_neuron_config(tmp_path, smollm2_dir, port, GRACE_SECS)
    with neuron_serve(config, port) as service:
        yield f"http://127.0.0.1:{port}", service.process


def test_the_gateway_drains_on_sigterm_and_ends_long_streams_in_their_dialect(tmp_path: Path) -> None:
    # The upstream is the scripted neuron process: its streams end when the test says so
    # ("hold" until /release) or never ("forever"), whatever the machine's speed.
    port = free_port()
    fake = start(
        "fake-neuron",
        [sys.executable, str(FAKE_NEURON), "--port", str(port), "--size", f"{MODEL}=100", "--preload", MODEL],
        tmp_path / "fake-neuron.log",
        clean_env(),
    )
    (tmp_path / "cortex.toml").write_text(
        f"[gateway]\nshutdown_grace_secs = {GATEWAY_GRACE_SECS}\n\n"
        f'[[neurons]]\nname = "local"\nendpoint = "http://127.0.0.1:{port}"\n\n[poller]\ninterval_secs = 0.2\n'
    )
    command = [
        sys.executable, "-m", "cortex_cli", "serve", "--json", "--config", str(tmp_path / "cortex.toml"),
        "--listen", f"127.0.0.1:{free_port()}", "--metrics-listen", f"127.0.0.1:{free_port()}",
    ]  # fmt: skip
    gateway = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=clean_env())
    assert gateway.stdout is not None
    try:
        api = read_ready_event(gateway.stdout, gateway)["api"]
        with httpx2.Client(timeout=HANG_GUARD_SECS) as client:
            deadline = time.monotonic() + HANG_GUARD_SECS
            while client.post(
                api + "/v1/chat/completions", json={**chat(SHORT, 2), "stream": False}
            ).is_error:
                assert time.monotonic() < deadline, "the gateway never routed to the neuron"
                time.sleep(0.2)
        anthropic = {"anthropic-version": "2023-06-01"}
        streams = {
            "short_openai": Stream(api + "/v1/chat/completions", chat("hold", 16)),
            "short_anthropic": Stream(api + "/v1/messages", message("hold", 16), anthropic),
            "long_openai": Stream(api + "/v1/chat/completions", chat("forever", 16)),
            "long_anthropic": Stream(api + "/v1/messages", message("forever", 16), anthropic),
        }
        for stream in streams.values():
            stream.start()
            assert stream.started.wait(HANG_GUARD_SECS)
        gateway.send_signal(signal.SIGTERM)
        # In flight at the signal, the held streams may still finish within the grace.
        with httpx2.Client(timeout=HANG_GUARD_SECS) as client:
            assert client.post(f"http://127.0.0.1:{port}/release").status_code == 204

        assert_openai_done(streams["short_openai"].finish())
        assert frames(streams["short_anthropic"].finish())[-1][0] == "message_stop"
        assert_openai_cut_with_error(streams["long_openai"].finish())
        long_anthropic = streams["long_anthropic"].finish()
        event, data = frames(long_anthropic)[-1]
        assert event == "error", long_anthropic[-500:]
        error = json.loads(data)
        assert error["type"] == "error" and error["error"]["type"] == "overloaded_error"
        assert "shutting down" in error["error"]["message"]
        assert "message_stop" not in long_anthropic
        assert gateway.wait(timeout=HANG_GUARD_SECS) == 0
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait()
        fake.stop()


def test_the_neuron_drains_on_sigterm_and_ends_long_streams_with_an_error_event(
    smollm2_neuron: tuple[str, subprocess.Popen[bytes]],
) -> None:
    url, process = smollm2_neuron
    # First, and answering (its prompt computed) before the long ones come: two steps to go.
    short = Stream(url + "/v1/chat/completions", chat(SHORT, 3)).start()
    assert short.answering.wait(HANG_GUARD_SECS)
    # Then two prompts whose prefill alone takes hundreds of steps (PREFILL_CHUNK tokens each);
    # their streams are open (keep-alive comments) long before a first token.
    long_chat = Stream(url + "/v1/chat/completions", chat(LONG_PROMPT, 500)).start()
    long_responses = Stream(
        url + "/v1/responses",
        {"model": MODEL, "input": LONG_PROMPT, "max_output_tokens": 500, "temperature": 0, "stream": True},
    ).start()
    for stream in (long_chat, long_responses):
        assert stream.started.wait(HANG_GUARD_SECS)
    process.send_signal(signal.SIGTERM)

    assert_openai_done(short.finish())
    assert_openai_cut_with_error(long_chat.finish())
    event, data = frames(long_responses.finish())[-1]
    assert event == "error", long_responses.text[-500:]
    payload = json.loads(data)
    assert payload["type"] == "error" and payload["code"] == "shutting_down"
    assert "response.completed" not in long_responses.text
    assert process.wait(timeout=HANG_GUARD_SECS) == 0
