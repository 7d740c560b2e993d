"""End to end on loopback: the official SDKs → a real gateway process → a real `neuron serve`
process running SmolLM2-135M-Instruct on the CPU.

Both processes are started once for the module (a torch start and a model load are the
expensive part) and stopped with SIGTERM at the end. Decoding is greedy so the answers do
not depend on luck.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from support.agent_bodies import AgentRequest, agent_request
from support.processes import Fleet, Service, local_fleet
from support.wording import PROMPT_TOO_LONG, SUM_EXCEEDS

pytestmark = pytest.mark.slow

ALIAS = "smollm2"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[Fleet]:
    model_id = str(smollm2_dir)
    with local_fleet(tmp_path_factory.mktemp("gateway-sdks"), model_id, {ALIAS: model_id}) as fleet:
        yield fleet


def anthropic_client(fleet: Fleet) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=fleet.gateway_url, api_key="x", max_retries=0, timeout=120)


def openai_client(fleet: Fleet) -> openai.OpenAI:
    return openai.OpenAI(base_url=fleet.gateway_url + "/v1", api_key="x", max_retries=0, timeout=120)


ASK = [{"role": "user", "content": QUESTION}]


def test_anthropic_sdk_gets_paris(fleet: Fleet) -> None:
    client = anthropic_client(fleet)
    message = client.messages.create(model=ALIAS, max_tokens=24, messages=ASK, extra_body={"temperature": 0})  # type: ignore[arg-type]
    text = "".join(block.text for block in message.content if block.type == "text")
    assert "Paris" in text, text
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    assert message.model == fleet.model_id


def test_anthropic_sdk_streams_paris(fleet: Fleet) -> None:
    client = anthropic_client(fleet)
    with client.messages.stream(
        model=ALIAS,
        max_tokens=24,
        messages=ASK,  # type: ignore[arg-type]
        extra_body={"temperature": 0},
    ) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    text = "".join(pieces)
    assert "Paris" in text, text
    assert len(pieces) > 1  # really streamed, token by token
    assert final.content[0].type == "text" and final.content[0].text == text
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0


def test_anthropic_prefill_is_continued(fleet: Fleet) -> None:
    """The answer continues the assistant's prefilled turn, as the OpenAI side's
    continue_final_message does for the same conversation."""
    prefill = "The capital of France is"
    messages = [*ASK, {"role": "assistant", "content": prefill}]
    message = anthropic_client(fleet).messages.create(
        model=ALIAS,
        max_tokens=12,
        messages=messages,  # type: ignore[arg-type]
        extra_body={"temperature": 0},
    )
    text = "".join(block.text for block in message.content if block.type == "text")
    continued = openai_client(fleet).chat.completions.create(
        model=ALIAS,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=12,
        temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    assert text == continued.choices[0].message.content
    assert "Paris" in text and not text.lstrip().startswith(prefill), text


def test_anthropic_message_start_already_carries_the_input_tokens(fleet: Fleet) -> None:
    body = {"model": ALIAS, "max_tokens": 8, "messages": ASK, "stream": True, "temperature": 0}
    with httpx2.Client(base_url=fleet.gateway_url, timeout=120) as client:
        text = client.post("/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"}).text
    frames = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    start = next(frame for frame in frames if frame["type"] == "message_start")
    delta = next(frame for frame in frames if frame["type"] == "message_delta")
    started = start["message"]["usage"]
    # The same input accounting at the start as at the end (clients show context use early).
    assert started["input_tokens"] > 0
    assert started["input_tokens"] == delta["usage"]["input_tokens"]


def test_anthropic_count_tokens_uses_the_model_template(fleet: Fleet, smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    # The oracle: transformers renders the model's own template and tokenizes it. (SmolLM2's
    # template adds a default system prompt when there is none, so "shorter" is not the test.)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)

    def expected(messages: list[dict[str, str]]) -> int:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(tokenizer(prompt, add_special_tokens=False).input_ids)

    client = anthropic_client(fleet)
    bare = client.messages.count_tokens(model=ALIAS, messages=ASK)  # type: ignore[arg-type]
    system = "Answer in one word."
    with_system = client.messages.count_tokens(model=ALIAS, system=system, messages=ASK)  # type: ignore[arg-type]
    assert bare.input_tokens == expected(ASK)
    assert with_system.input_tokens == expected([{"role": "system", "content": system}, *ASK])


def test_openai_sdk_chat_gets_paris(fleet: Fleet) -> None:
    client = openai_client(fleet)
    completion = client.chat.completions.create(model=ALIAS, messages=ASK, max_tokens=24, temperature=0)  # type: ignore[arg-type]
    answer = completion.choices[0].message.content or ""
    assert "Paris" in answer, answer
    stream = client.chat.completions.create(
        model=ALIAS,
        messages=ASK,  # type: ignore[arg-type]
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == answer


def test_openai_sdk_responses_gets_paris(fleet: Fleet) -> None:
    client = openai_client(fleet)
    response = client.responses.create(model=ALIAS, input=QUESTION, max_output_tokens=24, temperature=0)
    assert "Paris" in response.output_text, response.output_text
    with client.responses.stream(model=ALIAS, input=QUESTION, max_output_tokens=24, temperature=0) as stream:
        final = stream.get_final_response()
    assert final.output_text == response.output_text


SMOLLM2_CONTEXT = 8192
LONG_PROMPT = [{"role": "user", "content": "word " * SMOLLM2_CONTEXT}]


def test_anthropic_sdk_gets_anthropics_context_limit_wording(fleet: Fleet) -> None:
    client = anthropic_client(fleet)
    with (
        pytest.raises(anthropic.BadRequestError) as too_much,
        client.messages.stream(model=ALIAS, max_tokens=32000, messages=ASK) as stream,  # type: ignore[arg-type]
    ):
        stream.get_final_message()
    matched = SUM_EXCEEDS.match(too_much.value.body["error"]["message"])  # type: ignore[index]
    assert matched is not None, too_much.value.body
    prompt, max_tokens, limit = map(int, matched.groups())
    assert (max_tokens, limit) == (32000, SMOLLM2_CONTEXT)
    assert prompt == client.messages.count_tokens(model=ALIAS, messages=ASK).input_tokens  # type: ignore[arg-type]

    with pytest.raises(anthropic.BadRequestError) as too_long:
        client.messages.create(model=ALIAS, max_tokens=16, messages=LONG_PROMPT)  # type: ignore[arg-type]
    matched = PROMPT_TOO_LONG.match(too_long.value.body["error"]["message"])  # type: ignore[index]
    assert matched is not None, too_long.value.body
    assert int(matched.group(1)) > SMOLLM2_CONTEXT and int(matched.group(2)) == SMOLLM2_CONTEXT


def test_openai_paths_keep_vllms_context_wording(fleet: Fleet) -> None:
    client = openai_client(fleet)
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=ALIAS, messages=ASK, max_tokens=32000)  # type: ignore[arg-type]
    assert raised.value.code == "context_length_exceeded"
    assert raised.value.body["message"].startswith("This model's maximum context length is 8192 tokens.")  # type: ignore[index]


def test_one_request_id_from_the_sdk_through_both_processes_logs(fleet: Fleet) -> None:
    message = anthropic_client(fleet).messages.create(model=ALIAS, max_tokens=4, messages=ASK)  # type: ignore[arg-type]
    completion = openai_client(fleet).chat.completions.create(model=ALIAS, messages=ASK, max_tokens=4)  # type: ignore[arg-type]
    for request_id in (message._request_id, completion._request_id):
        assert request_id is not None and request_id.startswith("req_")
        # Each process logs the request once its answer is sent: poll the logs, not a clock.
        for service in (fleet.gateway, fleet.neuron):
            service.wait_for(logs(service, request_id), f"{request_id} in the {service.name} log")


def logs(service: Service, text: str) -> Callable[[], bool]:
    return lambda: text in service.output()


def test_models_retrieve_through_both_sdks_with_true_limits(fleet: Fleet) -> None:
    model = openai_client(fleet).models.retrieve(ALIAS)
    described = anthropic_client(fleet).models.retrieve(ALIAS)
    assert model.id == described.id == ALIAS
    assert model.model_extra is not None
    # The most a request can get: the window less the one token its prompt needs at least.
    assert model.model_extra["limit"] == {"context": 8192, "input": 8191, "output": 8191}


# --- requests captured from the real agents (tests/fixtures/agents) --------------------------


def replay(fleet: Fleet, request: AgentRequest, **fields: Any) -> httpx2.Response:
    """The agent's request as it sent it (method, path and query, headers), for our model."""
    with httpx2.Client(base_url=fleet.gateway_url, timeout=300) as client:
        body = request.with_body(model=ALIAS, **fields) if request.body is not None else None
        return client.request(request.method, request.path, json=body, headers=request.headers)


def sse_events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


def test_claude_code_probe(fleet: Fleet) -> None:
    probe = agent_request("claude-code-probe")
    assert (probe.method, probe.path) == ("HEAD", "/")
    response = replay(fleet, probe)
    assert response.status_code == 200 and response.headers["request-id"]


def test_claude_code_first_turn_gets_the_wording_it_retries_on(fleet: Fleet) -> None:
    first = agent_request("claude-code-first-turn")
    assert first.path == "/v1/messages?beta=true" and first.body is not None
    assert first.body["max_tokens"] == 32000
    response = replay(fleet, first)
    assert response.status_code == 400
    error = response.json()
    assert error["type"] == "error" and error["request_id"] == response.headers["request-id"]
    matched = SUM_EXCEEDS.match(error["error"]["message"])
    assert matched is not None, error
    prompt, max_tokens, limit = map(int, matched.groups())
    assert (max_tokens, limit) == (32000, SMOLLM2_CONTEXT)
    # count_tokens renders the same prompt as the request (tools and all), so the count an
    # agent gets beforehand is the number the refusal names.
    with httpx2.Client(base_url=fleet.gateway_url, timeout=120) as client:
        counted = client.post(
            "/v1/messages/count_tokens?beta=true", json=first.with_body(model=ALIAS), headers=first.headers
        )
    assert counted.status_code == 200 and counted.json() == {"input_tokens": prompt}


@pytest.mark.parametrize("name", ["claude-code-retry", "claude-code-continuation"])
def test_claude_code_turns_stream_an_answer(fleet: Fleet, name: str) -> None:
    turn = agent_request(name)
    # The agent's own max_tokens would let a 135M model ramble for minutes on a CPU.
    response = replay(fleet, turn, max_tokens=12)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    kinds = [event["type"] for event in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    assert text.strip()
    assert events[-2]["delta"]["stop_reason"] in ("end_turn", "max_tokens")
    assert events[-2]["usage"]["output_tokens"] > 0


def test_codex_turn_streams_a_response(fleet: Fleet) -> None:
    turn = agent_request("codex-turn")
    assert turn.path == "/v1/responses"
    response = replay(fleet, turn, max_output_tokens=12)
    assert response.status_code == 200, response.text
    events = sse_events(response.text)
    assert events[0]["type"] == "response.created"
    final = events[-1]
    assert final["type"] in ("response.completed", "response.incomplete")
    texts = [
        part["text"]
        for item in final["response"]["output"]
        if item["type"] == "message"
        for part in item["content"]
    ]
    assert "".join(texts).strip()
    # namespace and web_search tools were left out; the function tools were offered.
    offered = {tool["name"] for tool in final["response"]["tools"]}
    assert "exec_command" in offered and "multi_agent_v1" not in offered
