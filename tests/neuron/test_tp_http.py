"""Tensor parallel through the neuron's normal HTTP API (CPU ranks, gloo, world size 2).

A TP copy and a single-device copy of the same tiny checkpoint are loaded side by side;
concurrent streaming chat requests give the same greedy text on both. Killing the TP worker
mid-request errors that request, shows the model `poisoned` in /models, leaves the other
model serving, and unload + load brings the TP model back, exact again.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import httpx2
import pytest
from support.in_process_neuron import InProcessNeuron
from support.local_models import neuron_config
from support.processes import tp_worker_pids

pytestmark = pytest.mark.slow

QUESTIONS = ["Hello", "What is the capital of France?", "Count: 0 1 2", "def add(a, b):"]


class Node(InProcessNeuron):
    def __init__(self) -> None:
        super().__init__(neuron_config(allow_cpu_tensor_parallel=True, tensor_parallel_step_timeout_secs=10))

    async def chat(self, model: str, question: str) -> httpx2.Response:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 16,
            "temperature": 0,
            "stream": True,
        }
        return await self.client.post("/v1/chat/completions", json=body)

    async def model_info(self, model: str) -> dict[str, Any]:
        [info] = [m for m in (await self.client.get("/models")).json() if m["id"] == model]
        return info

    async def load_tp_and_single(self, folder: Path, tmp_path: Path) -> tuple[str, str]:
        """Two copies of `folder` loaded, one tensor parallel over two ranks and one in this
        process (distinct ids, so both can be loaded at once): (tp id, single id)."""
        tp_id = str(shutil.copytree(folder, tmp_path / "tp"))
        single_id = str(shutil.copytree(folder, tmp_path / "single"))
        for body in ({"model_id": single_id}, {"model_id": tp_id, "tensor_parallel": 2}):
            loaded = await self.client.post("/models/load", json=body)
            assert loaded.status_code == 200, loaded.text
        return tp_id, single_id


def streamed_text(response: httpx2.Response) -> str:
    assert response.status_code == 200, response.text
    chunks = [
        json.loads(line[6:])
        for line in response.text.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]
    assert chunks and not any("error" in c for c in chunks), response.text
    return "".join(
        (c["choices"][0]["delta"].get("content") or "")
        + (c["choices"][0]["delta"].get("reasoning_content") or "")
        for c in chunks
        if c.get("choices")
    )


async def test_tp_model_serves_poisons_and_reloads_over_http(tiny_qwen3: Path, tmp_path: Path) -> None:
    client = Node()
    try:
        # Loads happen inside the test: the manager's poison callback targets the loop that loaded.
        tp_id, single_id = await client.load_tp_and_single(tiny_qwen3, tmp_path)
        await serve_poison_reload(client, tp_id, single_id)
    finally:
        await client.close()
    assert tp_worker_pids() == []


async def serve_poison_reload(client: Node, tp_id: str, single_id: str) -> None:
    info = await client.model_info(tp_id)
    assert info["status"] == "loaded" and info["devices"] == [0, 1]

    async def both(question: str) -> tuple[str, str]:
        tp, single = await asyncio.gather(client.chat(tp_id, question), client.chat(single_id, question))
        return streamed_text(tp), streamed_text(single)

    # Concurrent streaming requests on both models: identical greedy text.
    results = await asyncio.gather(*(both(q) for q in QUESTIONS))
    for tp_text, single_text in results:
        assert tp_text == single_text and tp_text

    # Kill the worker while rank 0 is inside a collective of a running request.
    [pid] = tp_worker_pids()
    os.kill(pid, signal.SIGSTOP)
    killer = threading.Timer(0.5, os.kill, (pid, signal.SIGKILL))
    killer.start()
    failed = await client.chat(tp_id, "Hello")
    killer.join()
    assert "rank 1" in failed.text and "SIGKILL" in failed.text, failed.text
    info = await client.model_info(tp_id)
    assert info["status"] == "poisoned"
    assert "rank 1" in info["error"] and "SIGKILL" in info["error"]
    refused = await client.chat(tp_id, "Hello")
    assert refused.status_code == 500 and refused.json()["error"]["code"] == "model_poisoned"
    # The other model keeps serving.
    assert streamed_text(await client.chat(single_id, "Hello"))

    # Unload + load: exact again.
    assert (await client.client.post("/models/unload", json={"model_id": tp_id})).status_code == 200
    assert tp_worker_pids() == []
    again = await client.client.post("/models/load", json={"model_id": tp_id, "tensor_parallel": 2})
    assert again.status_code == 200, again.text
    tp_text, single_text = await both(QUESTIONS[1])
    assert tp_text == single_text


async def test_tp_refusals_are_client_errors(tiny_qwen3_moe: Path, tiny_qwen3: Path) -> None:
    node = Node()
    try:
        moe = await node.client.post(
            "/models/load", json={"model_id": str(tiny_qwen3_moe), "tensor_parallel": 2}
        )
        assert moe.status_code == 422 and "mixture-of-experts" in moe.json()["error"]["message"]
        odd = await node.client.post("/models/load", json={"model_id": str(tiny_qwen3), "tensor_parallel": 3})
        assert odd.status_code == 422 and "not divisible" in odd.json()["error"]["message"]
        assert tp_worker_pids() == []
    finally:
        await node.close()


async def test_tp_llama_streams_the_same_greedy_text_as_one_process(tiny_llama: Path, tmp_path: Path) -> None:
    client = Node()
    try:
        tp_id, single_id = await client.load_tp_and_single(tiny_llama, tmp_path)
        responses = await asyncio.gather(
            *(client.chat(model, question) for question in QUESTIONS for model in (tp_id, single_id))
        )
        texts = [streamed_text(response) for response in responses]
        for tp_text, single_text in zip(texts[::2], texts[1::2], strict=True):
            assert tp_text == single_text and tp_text
    finally:
        await client.close()
    assert tp_worker_pids() == []
