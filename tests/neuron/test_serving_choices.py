"""logprobs, n and assistant prefill through the neuron app, over the real engine and a tiny
random checkpoint, checked against transformers' own forward and generate()."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
from support.engine_harness import reference_greedy
from support.in_process_neuron import InProcessNeuron, serving, sse_data


@pytest.fixture(scope="module")
async def node(tiny_qwen3: Path) -> AsyncIterator[InProcessNeuron]:
    async with serving(tiny_qwen3) as node:
        yield node


def logprobs_at(model: Any, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits at each position that chose a generated token."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + generated])).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(generated)], dim=-1)


MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def chat_prompt(tokenizer: Any, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
    kwargs.setdefault("add_generation_prompt", True)
    rendered = tokenizer.apply_chat_template(messages, enable_thinking=False, **kwargs)
    return list(rendered if isinstance(rendered, list) else rendered["input_ids"])


async def test_chat_logprobs_are_the_models_streamed_and_not(
    node: InProcessNeuron, tiny_qwen3: Path, tiny_qwen3_reference: tuple[Any, Any]
) -> None:
    model, tokenizer = tiny_qwen3_reference
    prompt = chat_prompt(tokenizer, MESSAGES)
    tokens, _ = reference_greedy(model, prompt, 16)
    expected = logprobs_at(model, prompt, tokens)
    body = {
        "model": str(tiny_qwen3),
        "messages": MESSAGES,
        "max_tokens": 16,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 4,
    }
    whole = (await node.client.post("/v1/chat/completions", json=body)).json()
    content = whole["choices"][0]["logprobs"]["content"]
    assert whole["usage"]["completion_tokens"] == len(content) == len(tokens)
    for i, entry in enumerate(content):
        assert entry["logprob"] == pytest.approx(float(expected[i, tokens[i]]), abs=1e-4)
        top = entry["top_logprobs"]
        assert len(top) == 4
        values = [alternative["logprob"] for alternative in top]
        assert values == sorted(values, reverse=True)
        assert values == pytest.approx(torch.topk(expected[i], 4).values.tolist(), abs=1e-4)
        assert entry["token"] == bytes(entry["bytes"]).decode("utf-8", errors="backslashreplace")
    # The bytes of the tokens are exactly the generated text (byte tokens included).
    joined = b"".join(bytes(entry["bytes"]) for entry in content)
    assert joined.decode("utf-8", errors="replace") == tokenizer.decode(tokens, skip_special_tokens=False)

    chunks = sse_data((await node.client.post("/v1/chat/completions", json={**body, "stream": True})).text)
    streamed = [
        entry
        for c in chunks
        if c["choices"]
        for entry in (c["choices"][0].get("logprobs") or {}).get("content", [])
    ]
    # The same tokens; the values agree within float noise (the second request's prompt
    # comes from the prefix cache, computed in other shapes).
    assert [(e["token"], e["bytes"]) for e in streamed] == [(e["token"], e["bytes"]) for e in content]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in content], abs=1e-4)
    assert [len(e["top_logprobs"]) for e in streamed] == [4] * len(content)


async def test_completion_logprobs_in_the_legacy_shape(
    node: InProcessNeuron, tiny_qwen3: Path, tiny_qwen3_reference: tuple[Any, Any]
) -> None:
    model, tokenizer = tiny_qwen3_reference
    prompt = tokenizer.encode("The capital of France is")
    tokens, _ = reference_greedy(model, prompt, 10)
    expected = logprobs_at(model, prompt, tokens)
    body = {
        "model": str(tiny_qwen3),
        "prompt": prompt,
        "max_tokens": 10,
        "temperature": 0,
        "logprobs": 2,
    }
    for stream in (False, True):
        response = await node.client.post("/v1/completions", json={**body, "stream": stream})
        if stream:
            shaped: dict[str, list[Any]] = {
                "tokens": [],
                "token_logprobs": [],
                "top_logprobs": [],
                "text_offset": [],
            }
            for chunk in sse_data(response.text):
                for key in shaped:
                    shaped[key] += ((chunk["choices"] or [{}])[0].get("logprobs") or {}).get(key, [])
        else:
            shaped = response.json()["choices"][0]["logprobs"]
        assert shaped["token_logprobs"] == pytest.approx(
            [float(expected[i, t]) for i, t in enumerate(tokens)], abs=1e-4
        )
        assert all(2 <= len(top) <= 3 for top in shaped["top_logprobs"])  # the sampled token is always in
        assert shaped["text_offset"][0] == 0
        lengths = [len(token) for token in shaped["tokens"]]
        assert shaped["text_offset"] == [sum(lengths[:i]) for i in range(len(lengths))]


async def test_n_chat_choices_follow_their_seeds_streamed_and_not(
    node: InProcessNeuron, tiny_qwen3: Path
) -> None:
    body = {
        "model": str(tiny_qwen3),
        "messages": MESSAGES,
        "max_tokens": 12,
        "temperature": 1.2,
        "seed": 40,
        "n": 3,
    }
    whole = (await node.client.post("/v1/chat/completions", json=body)).json()
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2]
    texts = [c["message"]["content"] for c in whole["choices"]]
    alone = []
    for i in range(3):
        single = {**body, "n": 1, "seed": 40 + i}
        alone.append((await node.client.post("/v1/chat/completions", json=single)).json())
    assert texts == [a["choices"][0]["message"]["content"] for a in alone]
    assert len(set(texts)) == 3
    usage = whole["usage"]
    assert usage["prompt_tokens"] == alone[0]["usage"]["prompt_tokens"]  # the prompt counted once
    completion = sum(a["usage"]["completion_tokens"] for a in alone)
    assert usage["completion_tokens"] == completion

    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    chunks = sse_data((await node.client.post("/v1/chat/completions", json=stream_body)).text)
    by_index: dict[int, str] = {}
    finished = []
    for chunk in chunks:
        for choice in chunk["choices"]:
            by_index[choice["index"]] = by_index.get(choice["index"], "") + (
                choice["delta"].get("content") or ""
            )
            if choice["finish_reason"]:
                finished.append(choice["index"])
    assert [by_index[i] for i in range(3)] == texts
    assert sorted(finished) == [0, 1, 2]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == completion


async def test_n_completions_greedy_choices_agree(node: InProcessNeuron, tiny_qwen3: Path) -> None:
    body = {"model": str(tiny_qwen3), "prompt": "Hello, how are", "max_tokens": 8, "temperature": 0, "n": 2}
    response = (await node.client.post("/v1/completions", json=body)).json()
    first, second = response["choices"]
    assert (first["index"], second["index"]) == (0, 1)
    assert first["text"] == second["text"]
    single = (await node.client.post("/v1/completions", json={**body, "n": 1})).json()
    assert single["choices"][0]["text"] == first["text"]
    assert response["usage"]["completion_tokens"] == 2 * single["usage"]["completion_tokens"]


async def test_a_prefilled_assistant_turn_is_continued(
    node: InProcessNeuron, tiny_qwen3: Path, tiny_qwen3_reference: tuple[Any, Any]
) -> None:
    model, tokenizer = tiny_qwen3_reference
    messages = [*MESSAGES, {"role": "assistant", "content": "The capital of France is"}]
    prompt = chat_prompt(tokenizer, messages, add_generation_prompt=False, continue_final_message=True)
    assert tokenizer.decode(prompt).endswith("The capital of France is")
    tokens, finish = reference_greedy(model, prompt, 12)
    body = {
        "model": str(tiny_qwen3),
        "messages": messages,
        "max_tokens": 12,
        "temperature": 0,
        "continue_final_message": True,
        "add_generation_prompt": False,
    }
    whole = (await node.client.post("/v1/chat/completions", json=body)).json()
    assert whole["usage"]["prompt_tokens"] == len(prompt)
    assert whole["usage"]["completion_tokens"] == len(tokens)
    special = set(tokenizer.all_special_ids)
    text = tokenizer.decode([t for t in tokens if t not in special])
    message = whole["choices"][0]["message"]
    assert (message.get("reasoning_content") or "") + (message["content"] or "") == text
    assert whole["choices"][0]["finish_reason"] == finish

    counted = (await node.client.post("/v1/chat/count_tokens", json=body)).json()
    assert counted["input_tokens"] == len(prompt)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"continue_final_message": True}, "continue_final_message"),  # the last message is the user's
        (
            {"continue_final_message": True, "add_generation_prompt": True},
            "add_generation_prompt",
        ),
    ],
)
async def test_continue_final_message_refusals(
    node: InProcessNeuron, tiny_qwen3: Path, extra: dict[str, Any], param: str
) -> None:
    body = {"model": str(tiny_qwen3), "messages": MESSAGES, "max_tokens": 2, **extra}
    response = await node.client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


async def test_n_structured_choices_each_follow_the_schema(node: InProcessNeuron, tiny_qwen3: Path) -> None:
    """Every choice has its own grammar state (forked from the request's), so each answer
    is a whole document of the schema: one state shared by three sequences would refuse
    the second one's first token."""
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "pick": {"enum": ["red", "green", "blue"]}},
        "required": ["ok", "pick"],
        "additionalProperties": False,
    }
    body = {
        "model": str(tiny_qwen3),
        "messages": MESSAGES,
        "max_tokens": 60,
        "temperature": 1.0,
        "seed": 3,
        "n": 3,
        "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}},
    }
    whole = (await node.client.post("/v1/chat/completions", json=body)).json()
    answers = [json.loads(choice["message"]["content"]) for choice in whole["choices"]]
    assert [sorted(answer) for answer in answers] == [["ok", "pick"]] * 3
    assert all(isinstance(a["ok"], bool) and a["pick"] in ("red", "green", "blue") for a in answers)
