"""The serving layer over the real engine and a tiny random checkpoint, through the neuron app.

Golden: greedy text through /v1/completions equals transformers' greedy generate(); the
chat path agrees with itself streaming and not; seeds reproduce; a repeated prompt is
reported as cached; a client that hangs up frees its batch slot.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from support.engine_harness import reference_greedy
from support.in_process_neuron import InProcessNeuron, serving, sse_data
from support.raw_asgi import drive

HANG_GUARD_SECS = 120


@pytest.fixture(scope="module")
async def node(tiny_qwen3: Path) -> AsyncIterator[InProcessNeuron]:
    async with serving(tiny_qwen3) as node:
        yield node


async def test_greedy_completion_equals_transformers_generate(
    node: InProcessNeuron, tiny_qwen3: Path, tiny_qwen3_reference: tuple[Any, Any]
) -> None:
    model, tokenizer = tiny_qwen3_reference
    prompt = "The capital of France is"
    ids = tokenizer.encode(prompt)
    tokens, finish = reference_greedy(model, ids, 24)
    body = {"model": str(tiny_qwen3), "prompt": prompt, "max_tokens": 24, "temperature": 0}
    response = (await node.client.post("/v1/completions", json=body)).json()
    special = set(tokenizer.all_special_ids)
    assert response["choices"][0]["text"] == tokenizer.decode([t for t in tokens if t not in special])
    assert response["choices"][0]["finish_reason"] == finish
    assert response["usage"]["completion_tokens"] == len(tokens)
    assert response["usage"]["prompt_tokens"] == len(ids)


async def test_chat_streaming_equals_non_streaming_and_usage_is_right(
    node: InProcessNeuron, tiny_qwen3: Path, tiny_qwen3_reference: tuple[Any, Any]
) -> None:
    model, tokenizer = tiny_qwen3_reference
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    body = {"model": str(tiny_qwen3), "messages": messages, "max_tokens": 20, "temperature": 0}
    whole = (await node.client.post("/v1/chat/completions", json=body)).json()
    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    chunks = sse_data((await node.client.post("/v1/chat/completions", json=stream_body)).text)

    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)
    prompt_ids = prompt if isinstance(prompt, list) else prompt["input_ids"]
    tokens, finish = reference_greedy(model, prompt_ids, 20)
    message = whole["choices"][0]["message"]
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    streamed_reasoning = "".join(
        c["choices"][0]["delta"].get("reasoning_content") or "" for c in chunks if c["choices"]
    )
    assert streamed == (message["content"] or "")
    assert streamed_reasoning == message.get("reasoning_content", "")
    assert whole["usage"]["prompt_tokens"] == len(prompt_ids)
    assert whole["usage"]["completion_tokens"] == chunks[-1]["usage"]["completion_tokens"] == len(tokens)
    assert whole["choices"][0]["finish_reason"] == finish


async def test_seed_reproduces_and_stop_string_cuts(node: InProcessNeuron, tiny_qwen3: Path) -> None:
    body = {
        "model": str(tiny_qwen3),
        "prompt": "Hello, how are",
        "max_tokens": 16,
        "temperature": 1.0,
        "seed": 1234,
    }
    first, second = [
        (await node.client.post("/v1/completions", json=body)).json()["choices"][0]["text"] for _ in range(2)
    ]
    assert first == second and first
    stop = first[len(first) // 2 : len(first) // 2 + 2]
    cut = (await node.client.post("/v1/completions", json={**body, "stop": [stop]})).json()
    assert cut["choices"][0]["text"] == first[: first.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    # Which stop string ended it (vLLM's stop_reason): the Anthropic dialect reports it as stop_sequence.
    assert cut["choices"][0]["stop_reason"] == stop
    assert "stop_reason" not in (await node.client.post("/v1/completions", json=body)).json()["choices"][0]

    chat = {
        "model": body["model"],
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 16,
        "seed": 7,
    }
    free = (await node.client.post("/v1/chat/completions", json=chat)).json()["choices"][0]["message"][
        "content"
    ]
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    for stream in (False, True):
        response = await node.client.post(
            "/v1/chat/completions", json={**chat, "stop": stop, "stream": stream}
        )
        if stream:
            frames = [line[6:] for line in response.text.splitlines() if line.startswith("data: {")]
            choice = [c for c in (json.loads(f)["choices"] for f in frames) if c][-1][0]
        else:
            choice = response.json()["choices"][0]
        assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", stop)


async def test_repeated_prompt_reports_cached_tokens(node: InProcessNeuron, tiny_qwen3: Path) -> None:
    messages = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 4}]
    body = {"model": str(tiny_qwen3), "messages": messages, "max_tokens": 4, "temperature": 0}
    await node.client.post("/v1/chat/completions", json=body)
    again = (await node.client.post("/v1/chat/completions", json=body)).json()
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached < again["usage"]["prompt_tokens"]


async def test_continuous_usage_puts_prompt_and_cached_tokens_on_every_chunk(
    node: InProcessNeuron, tiny_qwen3: Path
) -> None:
    messages = [{"role": "user", "content": "Hello, how are you today? " * 3}]
    body = {
        "model": str(tiny_qwen3),
        "messages": messages,
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    await node.client.post("/v1/chat/completions", json=body)  # seeds the prefix cache
    response = await node.client.post("/v1/chat/completions", json=body)
    chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    usages = [chunk["usage"] for chunk in chunks]
    final = usages[-1]
    # From the very first chunk (the role): what message_start of the Anthropic dialect needs.
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert usages[0]["prompt_tokens"] == final["prompt_tokens"] > 0
    assert (
        0
        < usages[0]["prompt_tokens_details"]["cached_tokens"]
        == final["prompt_tokens_details"]["cached_tokens"]
    )
    counts = [usage["completion_tokens"] for usage in usages]
    assert counts == sorted(counts) and counts[-1] == final["completion_tokens"] > 0
    # Without the option only the last chunk carries usage, as OpenAI specifies.
    plain = await node.client.post(
        "/v1/chat/completions", json={**body, "stream_options": {"include_usage": True}}
    )
    frames = [json.loads(line[6:]) for line in plain.text.splitlines() if line.startswith("data: {")]
    assert [("usage" in frame) for frame in frames] == [False] * (len(frames) - 1) + [True]


async def test_client_hang_up_frees_the_slot(node: InProcessNeuron, tiny_qwen3: Path) -> None:
    model_id = str(tiny_qwen3)
    engine = node.manager.get(model_id).engine
    body = {
        "model": model_id,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 900,
        "temperature": 1.0,
        "seed": 5,
        "stream": True,
    }
    hang_up = asyncio.Event()

    def on_body(chunk: bytes) -> str | None:
        if b'"content":"' in chunk:
            assert engine.load().in_flight == 1
            return "disconnect"
        return None

    await drive(node.app, body, on_body, disconnected=hang_up, guard_secs=HANG_GUARD_SECS)
    assert hang_up.is_set()
    for _ in range(HANG_GUARD_SECS * 10):
        if engine.load().in_flight == 0:
            break
        await asyncio.sleep(0.1)
    assert engine.load().in_flight == 0
