"""The /v1 routes in process, over a scripted engine that replays a token sequence.

The scripted engine is a test double for the Engine protocol: it yields the token ids it
was given (as if sampled), then a finish event, and records whether the consumer closed it
early (a cancelled sequence). Streams are read through httpx2's ASGI transport, or through a
raw ASGI driver where the test must act on frames as they arrive (keep-alive, disconnect).
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from starlette.applications import Starlette
from support.engine_harness import HANG_GUARD_SECS
from support.raw_asgi import drive
from transformers import AutoConfig, AutoTokenizer

from cortex_core.errors import ApiError
from cortex_core.neuron_api import ModelLoad, ModelSpec
from neuron.engine.api import GenerationRequest, TokenEvent
from neuron.loaded_model import LoadedModel
from neuron.serving import inference_routes

# A schema llguidance cannot enforce (`not` is not implemented): refused before any work.
UNENFORCEABLE_SCHEMA = {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}
UNENFORCEABLE_FORMAT = {"type": "json_schema", "json_schema": {"name": "x", "schema": UNENFORCEABLE_SCHEMA}}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@dataclass
class ScriptedEngine:
    tokens: list[int] = field(default_factory=list)
    finish: str = "stop"
    cached_tokens: int = 0
    # The first token waits for this event (a long prefill the test ends when it wants).
    gate: asyncio.Event | None = None
    refuse: ApiError | None = None
    fail_after: int | None = None
    requests: list[GenerationRequest] = field(default_factory=list)
    closed_early: int = 0
    finished: int = 0

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        if self.refuse is not None:
            raise self.refuse
        self.requests.append(request)
        return self._events(request)

    def generate_choices(self, request: GenerationRequest, n: int) -> list[AsyncIterator[TokenEvent]]:
        if self.refuse is not None:
            raise self.refuse
        self.requests.append(request)
        return [self._events(request) for _ in range(n)]

    async def _events(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        prompt = len(request.prompt_ids)
        tokens = self.tokens[: request.max_new_tokens]
        done = False
        try:
            if self.gate is not None:
                await self.gate.wait()
            for count, token in enumerate(tokens, 1):
                if self.fail_after is not None and count > self.fail_after:
                    raise RuntimeError("device fault: CUDA error: an illegal memory access")
                reason = None
                if count == len(tokens):
                    reason = "length" if len(self.tokens) > request.max_new_tokens else self.finish
                    done = True  # like the engine: a stream that delivered its finish is complete
                yield TokenEvent(token, reason, prompt, self.cached_tokens, count)  # type: ignore[arg-type]
                await asyncio.sleep(0)
            if not tokens:
                done = True
                yield TokenEvent(None, "stop", prompt, self.cached_tokens, 0)
        finally:
            if done:
                self.finished += 1
            else:
                self.closed_early += 1

    def load(self) -> ModelLoad:
        return ModelLoad(id="tiny")

    async def close(self) -> None:
        return None


@pytest.fixture(scope="module")
def tiny_parts(tiny_qwen3: Path) -> tuple[Any, Any, str]:
    return (
        AutoTokenizer.from_pretrained(tiny_qwen3),
        AutoConfig.from_pretrained(tiny_qwen3),
        (tiny_qwen3 / "chat_template.jinja").read_text(),
    )


@dataclass
class Harness:
    tokenizer: Any
    engine: ScriptedEngine
    app: Starlette
    models: dict[str, LoadedModel]

    def script(self, text: str, **kw: Any) -> None:
        self.engine.tokens = self.tokenizer.encode(text, add_special_tokens=False)
        for key, value in kw.items():
            setattr(self.engine, key, value)

    def client(self) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=self.app), base_url="http://test")


def make_harness(
    tiny_parts: tuple[Any, Any, str], *, template: str | None = None, keepalive: float = 5.0
) -> Harness:
    tokenizer, hf_config, qwen_template = tiny_parts
    engine = ScriptedEngine()
    loaded = LoadedModel(
        model_id="tiny",
        spec=ModelSpec(model_id="tiny"),
        path=Path("."),
        tokenizer=tokenizer,
        hf_config=hf_config,
        generation_config={"eos_token_id": tokenizer.eos_token_id},
        chat_template=template if template is not None else qwen_template,
        engine=engine,
        worker=None,  # type: ignore[arg-type]  # the scripted engine runs no torch
    )
    models = {"tiny": loaded}

    def lookup(model_id: str) -> LoadedModel:
        if model_id not in models:
            raise ApiError(404, f"model '{model_id}' not loaded on this neuron", code="model_not_found")
        return models[model_id]

    app = Starlette(routes=inference_routes(lookup, keepalive_secs=keepalive))
    return Harness(tokenizer, engine, app, models)


@pytest.fixture
def harness(tiny_parts: tuple[Any, Any, str]) -> Harness:
    return make_harness(tiny_parts)


def chat(content: str = "What is the capital of France?", **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **extra}


def sse_payloads(text: str) -> list[Any]:
    """`data:` payloads in order ("[DONE]" kept as a string); comments are dropped."""
    out: list[Any] = []
    for frame in text.split("\n\n"):
        for line in frame.splitlines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


def joined(chunks: list[dict[str, Any]], key: str) -> str:
    return "".join(c["choices"][0]["delta"].get(key) or "" for c in chunks if c.get("choices"))


# --- chat, non-streaming ------------------------------------------------------------------


async def test_chat_answer_with_usage(harness: Harness) -> None:
    harness.script("Paris is the capital.", cached_tokens=3)
    async with harness.client() as client:
        response = await client.post("/v1/chat/completions", json=chat(max_tokens=50))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Paris is the capital."}
    assert choice["finish_reason"] == "stop"
    request = harness.engine.requests[0]
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(request.prompt_ids)
    assert usage["completion_tokens"] == len(harness.engine.tokens)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 3}
    # The prompt is the rendered template, tokenised without extra specials.
    rendered = harness.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
        enable_thinking=False,
    )
    assert request.prompt_ids == harness.tokenizer.encode(rendered, add_special_tokens=False)
    assert request.max_new_tokens == 50
    assert harness.tokenizer.eos_token_id in request.stop_token_ids


async def test_chat_length_and_stop_strings(harness: Harness) -> None:
    harness.script("one two three four five")
    async with harness.client() as client:
        cut = (await client.post("/v1/chat/completions", json=chat(max_tokens=2))).json()
        stopped = (await client.post("/v1/chat/completions", json=chat(stop=["three"]))).json()
    assert cut["choices"][0]["finish_reason"] == "length"
    assert cut["usage"]["completion_tokens"] == 2
    assert stopped["choices"][0]["message"]["content"] == "one two "
    assert stopped["choices"][0]["finish_reason"] == "stop"
    # The stop string ended the sequence early: the engine stream was closed, not drained.
    assert harness.engine.closed_early == 1
    assert stopped["usage"]["completion_tokens"] < len(harness.engine.tokens)


async def test_reasoning_is_split_from_content(harness: Harness) -> None:
    harness.script("<think>\nThe user asks about France.\n</think>\n\nParis.")
    body = chat(chat_template_kwargs={"enable_thinking": True})
    async with harness.client() as client:
        plain = (await client.post("/v1/chat/completions", json=body)).json()
        wrapped = (
            await client.post("/v1/chat/completions", json=body, headers={"x-include-thinking": " TRUE "})
        ).json()
    message = plain["choices"][0]["message"]
    assert message["content"] == "Paris."
    assert message["reasoning_content"] == message["reasoning"] == "The user asks about France.\n"
    assert plain["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0
    assert wrapped["choices"][0]["message"]["content"] == "<think>The user asks about France.\n</think>Paris."
    assert "reasoning_content" not in wrapped["choices"][0]["message"]


THINKING_OFF = "<|im_start|>assistant\n<think>\n\n</think>\n\n"  # the template's switch


@pytest.mark.parametrize(
    ("path", "body", "headers", "thinks"),
    [
        ("/v1/chat/completions", chat(), {}, False),
        ("/v1/chat/completions", chat(), {"x-include-thinking": "yes"}, True),
        ("/v1/chat/completions", chat(reasoning_effort="low"), {}, True),
        ("/v1/chat/completions", chat(reasoning_effort="none"), {"x-include-thinking": "1"}, False),
        ("/v1/chat/completions", chat(chat_template_kwargs={"enable_thinking": True}), {}, True),
        ("/v1/responses", {"model": "tiny", "input": "x"}, {}, True),  # left to the template
        ("/v1/responses", {"model": "tiny", "input": "x", "reasoning": {"effort": "none"}}, {}, False),
    ],
)
async def test_enable_thinking_default(
    harness: Harness, path: str, body: dict[str, Any], headers: dict[str, str], thinks: bool
) -> None:
    harness.script("Paris.")
    async with harness.client() as client:
        assert (await client.post(path, json=body, headers=headers)).status_code == 200
    prompt = harness.tokenizer.decode(harness.engine.requests[0].prompt_ids)
    assert prompt.endswith(THINKING_OFF) is not thinks
    assert prompt.endswith("<|im_start|>assistant\n") is thinks


async def test_generation_starting_inside_think(tiny_parts: tuple[Any, Any, str]) -> None:
    opens_think = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "<|im_start|>assistant\n<think>\n"
    )
    harness = make_harness(tiny_parts, template=opens_think)
    harness.script("Reasoning without an opening marker.</think>\n\nParis.")
    async with harness.client() as client:
        body = (await client.post("/v1/chat/completions", json=chat())).json()
        harness.script("Cut off while still thinking", finish="length")
        cut = (await client.post("/v1/chat/completions", json=chat())).json()
    assert body["choices"][0]["message"]["content"] == "Paris."
    assert body["choices"][0]["message"]["reasoning_content"] == "Reasoning without an opening marker."
    assert cut["choices"][0]["message"]["content"] == ""
    assert cut["choices"][0]["message"]["reasoning_content"] == "Cut off while still thinking"


TOOL_OUTPUT = (
    'Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>'
)


async def test_tool_calls_non_streaming(harness: Harness) -> None:
    harness.script(TOOL_OUTPUT)
    async with harness.client() as client:
        with_tools = (await client.post("/v1/chat/completions", json=chat(tools=[WEATHER_TOOL]))).json()
        without = (await client.post("/v1/chat/completions", json=chat())).json()
    choice = with_tools["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me look."
    (call,) = choice["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Zürich"}
    # The tools were rendered into the prompt.
    assert "get_weather" in harness.tokenizer.decode(harness.engine.requests[0].prompt_ids)
    # No tools in the request: no parsing, the text is the answer.
    assert without["choices"][0]["finish_reason"] == "stop"
    assert "<tool_call>" in without["choices"][0]["message"]["content"]


# A template with no place for tools (SmolLM2's, say): they go into the system message.
TOOLLESS_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


async def test_tools_reach_a_model_whose_template_has_no_place_for_them(
    tiny_parts: tuple[Any, Any, str],
) -> None:
    harness = make_harness(tiny_parts, template=TOOLLESS_TEMPLATE)
    harness.script(TOOL_OUTPUT)
    history = [
        {"role": "user", "content": "Weather in Bern?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Bern"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "12 C"},
        {"role": "user", "content": "And in Zürich?"},
    ]
    async with harness.client() as client:
        answer = (
            await client.post("/v1/chat/completions", json=chat(tools=[WEATHER_TOOL]) | {"messages": history})
        ).json()
    prompt = harness.tokenizer.decode(harness.engine.requests[0].prompt_ids)
    assert prompt.startswith("<|im_start|>system\n# Tools\n")
    assert '{"name": "get_weather", "parameters": {"type": "object"' in prompt
    assert '<tool_call>\n{"name": "<function name>"' in prompt  # how to call, in the parser's format
    # The earlier call and its result are in the conversation, as text the model can read.
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bern"}}' in prompt
    )
    assert "<|im_start|>user\nTool result:\n12 C<|im_end|>" in prompt
    (call,) = answer["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"


def wordy_tool(name: str) -> dict[str, Any]:
    """A tool described at the length of a coding agent's (pages of guidance)."""
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": "Gets the weather for a city. " + "Mind the many caveats of forecasting. " * 150,
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "The city, in English. " * 20}},
                "required": ["city"],
            },
        },
    }


async def test_tools_listed_in_the_prompt_leave_half_of_the_window_to_the_answer(
    tiny_parts: tuple[Any, Any, str],
) -> None:
    """Listed whole, one wordy tool would take the prompt past half of a 2,048-token window (a
    coding agent's 25 tools take 20,000 tokens, SmolLM2's window is 8,192): it is listed
    briefly. A hundred tools, or one beside a conversation that already fills half of the
    window, are left out. The request is answered every time."""
    tokenizer, hf_config, template = tiny_parts
    wider = copy.deepcopy(hf_config)
    wider.max_position_embeddings = 2048
    harness = make_harness((tokenizer, wider, template), template=TOOLLESS_TEMPLATE)
    assert len(tokenizer.encode(json.dumps(wordy_tool("x")))) > 2048 / 2
    long_question = "Tell me about the weather in every city you know. " * 45
    assert len(tokenizer.encode(long_question)) > 2048 / 2
    cases = [
        chat(tools=[wordy_tool("get_weather")]),
        chat(tools=[wordy_tool(f"tool_{i}") for i in range(100)]),
        chat(long_question, tools=[wordy_tool("get_weather")], max_tokens=16),
    ]
    prompts = []
    for body in cases:
        harness.script("Sunny.")
        async with harness.client() as client:
            response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        prompts.append(tokenizer.decode(harness.engine.requests[-1].prompt_ids))
    brief, many, crowded = prompts
    assert (
        '{"name": "get_weather", "description": "Gets the weather for a city.", "parameters": '
        '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}' in brief
    )
    assert "caveats" not in brief
    assert "# Tools" not in many and "tool_0" not in many
    assert "# Tools" not in crowded and long_question.strip() in crowded


async def test_tool_calls_streaming_reassemble_to_the_same_call(harness: Harness) -> None:
    harness.script(TOOL_OUTPUT)
    async with harness.client() as client:
        response = await client.post("/v1/chat/completions", json=chat(tools=[WEATHER_TOOL], stream=True))
    chunks = [p for p in sse_payloads(response.text) if p != "[DONE]"]
    deltas = [c["choices"][0]["delta"].get("tool_calls") for c in chunks if c["choices"]]
    calls = [d[0] for d in deltas if d]
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert len(calls) > 2  # name first, then argument deltas
    arguments = "".join(c["function"].get("arguments", "") for c in calls)
    assert json.loads(arguments) == {"city": "Zürich"}
    assert joined(chunks, "content") == "Let me look."
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


# --- chat, streaming ------------------------------------------------------------------


@pytest.mark.parametrize("include_usage", [True, False])
async def test_chat_stream_shape(harness: Harness, include_usage: bool) -> None:
    harness.script("Paris is the capital.")
    body = chat(stream=True, stream_options={"include_usage": include_usage})
    async with harness.client() as client:
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert joined(chunks, "content") == "Paris is the capital."
    if include_usage:
        usage_chunk = chunks[-1]
        assert usage_chunk["choices"] == []
        assert usage_chunk["usage"]["completion_tokens"] == len(harness.engine.tokens)
        assert usage_chunk["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        chunks = chunks[:-1]
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}


async def test_chat_stream_reasoning_content(harness: Harness) -> None:
    harness.script("<think>Short thought.</think>Paris.")
    body = chat(stream=True, chat_template_kwargs={"enable_thinking": True})
    async with harness.client() as client:
        plain = sse_payloads((await client.post("/v1/chat/completions", json=body)).text)[:-1]
        response = await client.post("/v1/chat/completions", json=body, headers={"x-include-thinking": "1"})
        wrapped = sse_payloads(response.text)[:-1]
    assert joined(plain, "reasoning_content") == joined(plain, "reasoning") == "Short thought."
    assert joined(plain, "content") == "Paris."
    assert joined(wrapped, "content") == "<think>Short thought.</think>Paris."
    assert joined(wrapped, "reasoning_content") == ""


async def test_openai_sdk_in_process(harness: Harness) -> None:
    harness.script("Paris is the capital.")
    async with harness.client() as http:
        client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=http)
        answer = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}]
        )
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        streamed = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    assert answer.choices[0].message.content == streamed == "Paris is the capital."


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (chat(model="nope"), 404, "model_not_found"),
        (chat(n=17), 400, "invalid_parameter"),
        (chat(n=0), 400, "invalid_parameter"),
        (chat(logprobs=True, top_logprobs=21), 400, "invalid_parameter"),
        (chat(top_logprobs=2), 400, "invalid_parameter"),
        (chat(logit_bias={"99999": 1}), 400, "invalid_parameter"),
        (chat(logit_bias={"5": 100.5}), 400, "invalid_parameter"),
        (chat(logit_bias={"x5": 1}), 400, "invalid_parameter"),
        (chat(response_format=UNENFORCEABLE_FORMAT), 400, "unsupported_schema"),
        (chat(tool_choice="required"), 400, "invalid_parameter"),
        (chat(max_tokens=5000), 400, "context_length_exceeded"),
        ({"model": "tiny", "messages": [{"role": "user", "content": 3}]}, 400, "invalid_request_body"),
        (
            chat(chat_template_kwargs={"enable_thinking": True})
            | {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            400,
            "vision_unsupported",
        ),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_errors_before_the_stream_are_plain_envelopes(
    harness: Harness, body: dict[str, Any], status: int, code: str, stream: bool
) -> None:
    harness.script("unused")
    async with harness.client() as client:
        response = await client.post("/v1/chat/completions", json={**body, "stream": stream})
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"] == "invalid_request_error"
    assert harness.engine.requests == []


async def test_malformed_json_and_template_errors(tiny_parts: tuple[Any, Any, str]) -> None:
    harness = make_harness(tiny_parts, template="{{ raise_exception('only user messages, please') }}")
    async with harness.client() as client:
        malformed = await client.post("/v1/chat/completions", content=b"{not json")
        template = await client.post("/v1/chat/completions", json=chat())
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "malformed_json"
    assert template.status_code == 400
    assert "only user messages, please" in template.json()["error"]["message"]


async def test_engine_refusal_is_a_plain_error_even_when_streaming(harness: Harness) -> None:
    harness.engine.refuse = ApiError(503, "model tiny is busy", code="queue_full", retry_after=2)
    async with harness.client() as client:
        response = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "2"
    assert response.json()["error"]["code"] == "queue_full"


async def test_failure_after_the_stream_opened_ends_it_with_an_error_chunk(harness: Harness) -> None:
    harness.script("Paris is the capital of France.", fail_after=2)
    async with harness.client() as client:
        response = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert response.status_code == 200
    payloads = sse_payloads(response.text)
    error = payloads[-1]["error"]
    assert error["type"] == "api_error"
    assert "illegal memory access" in error["message"]  # the whole chain, for fault triage
    assert "[DONE]" not in payloads


# --- keep-alive and disconnects (raw ASGI, acting on frames as they arrive) ----------------------


async def test_keepalive_comments_while_the_first_token_is_slow(tiny_parts: tuple[Any, Any, str]) -> None:
    harness = make_harness(tiny_parts, keepalive=0.05)
    gate = asyncio.Event()
    harness.script("Paris.", gate=gate)
    frames: list[bytes] = []

    def on_body(chunk: bytes) -> None:
        frames.append(chunk)
        if frames.count(b": keep-alive\n\n") == 3:
            gate.set()  # the "prefill" ends only after the client has seen keep-alives

    await drive(harness.app, chat(stream=True), on_body)
    text = b"".join(frames).decode()
    first_text = next(i for i, f in enumerate(frames) if b'"content":"' in f and b'"content":""' not in f)
    assert frames.index(b": keep-alive\n\n") < first_text
    assert joined(sse_payloads(text)[:-1], "content") == "Paris."
    assert sse_payloads(text)[-1] == "[DONE]"
    assert harness.engine.finished == 1


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
async def test_disconnect_mid_stream_cancels_generation(harness: Harness, spec_version: str) -> None:
    harness.script("one two three four five six seven eight nine ten " * 5)
    seen: list[bytes] = []

    def on_body(chunk: bytes) -> str | None:
        seen.append(chunk)
        return "disconnect" if b'"content":"one"' in chunk or len(seen) > 3 else None

    await drive(harness.app, chat(stream=True), on_body, spec_version=spec_version)
    for _ in range(100):
        if harness.engine.closed_early:
            break
        await asyncio.sleep(0.01)
    assert harness.engine.closed_early == 1 and harness.engine.finished == 0


async def test_disconnect_while_waiting_for_a_non_streaming_answer_cancels(harness: Harness) -> None:
    gate = asyncio.Event()  # never set: the answer would never come
    harness.script("Paris.", gate=gate)
    hang_up = asyncio.Event()
    app_done = asyncio.ensure_future(drive(harness.app, chat(), lambda chunk: None, disconnected=hang_up))
    for _ in range(200):
        if harness.engine.requests:
            break
        await asyncio.sleep(0.01)
    assert harness.engine.requests, "the request never reached the engine"
    hang_up.set()
    await asyncio.wait_for(app_done, 60)
    assert harness.engine.closed_early == 1


# --- completions and count_tokens --------------------------------------------------------------


async def test_completions_text_and_token_prompts(harness: Harness) -> None:
    harness.script(" Paris. The capital of Germany is Berlin.")
    prompt_ids = harness.tokenizer.encode("The capital of France is", add_special_tokens=False)
    async with harness.client() as client:
        text = (
            await client.post("/v1/completions", json={"model": "tiny", "prompt": "The capital of France is"})
        ).json()
        ids = (
            await client.post(
                "/v1/completions",
                json={"model": "tiny", "prompt": prompt_ids, "stop": [" The"], "max_tokens": 64},
            )
        ).json()
        streamed = (
            await client.post(
                "/v1/completions",
                json={
                    "model": "tiny",
                    "prompt": "x",
                    "stream": True,
                    "max_tokens": 64,
                    "stream_options": {"include_usage": True},
                },
            )
        ).text
    assert text["object"] == "text_completion"
    assert harness.engine.requests[0].max_new_tokens == 16  # the legacy API's default
    assert harness.engine.requests[1].prompt_ids == prompt_ids
    assert ids["choices"][0]["text"] == " Paris."
    assert ids["choices"][0]["finish_reason"] == "stop"
    payloads = sse_payloads(streamed)
    assert payloads[-1] == "[DONE]"
    assert "".join(p["choices"][0]["text"] for p in payloads[:-1] if p["choices"]) == (
        " Paris. The capital of Germany is Berlin."
    )
    assert payloads[-2]["usage"]["completion_tokens"] == len(harness.engine.tokens)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [1, 10_000_000]}, "prompt"),
        ({"prompt": "a", "echo": True}, "echo"),
        ({"prompt": "a", "best_of": 3}, "best_of"),
        ({"prompt": "a", "logprobs": 21}, "logprobs"),
        ({"prompt": "a", "n": 17}, "n"),
        ({"prompt": "a", "logit_bias": {"99999": 3}}, "logit_bias"),
    ],
)
async def test_completions_refusals(harness: Harness, body: dict[str, Any], param: str) -> None:
    async with harness.client() as client:
        response = await client.post("/v1/completions", json={"model": "tiny", **body})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


async def test_count_tokens_matches_the_prompt_sent_to_the_engine(harness: Harness) -> None:
    harness.script("ok")
    body = chat(tools=[WEATHER_TOOL])
    async with harness.client() as client:
        counted = (await client.post("/v1/chat/count_tokens", json=body)).json()
        await client.post("/v1/chat/completions", json=body)
    assert counted == {"input_tokens": len(harness.engine.requests[0].prompt_ids)}


# --- responses ------------------------------------------------------------------------------


def named_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for frame in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.splitlines() if not line.startswith(":"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out


async def test_responses_non_streaming(harness: Harness) -> None:
    harness.script("<think>Recall geography.</think>Paris.", cached_tokens=2)
    body = {
        "model": "tiny",
        "input": "Capital of France?",
        "instructions": "Be brief.",
        "max_output_tokens": 40,
    }
    async with harness.client() as client:
        response = (await client.post("/v1/responses", json=body)).json()
    assert response["object"] == "response" and response["id"].startswith("resp_")
    assert response["status"] == "completed"
    kinds = [item["type"] for item in response["output"]]
    assert kinds == ["reasoning", "message"]
    assert response["output"][0]["content"][0]["text"] == "Recall geography."
    assert response["output"][1]["content"][0]["text"] == "Paris."
    assert response["usage"]["input_tokens_details"]["cached_tokens"] == 2
    assert response["usage"]["output_tokens"] == len(harness.engine.tokens)
    request = harness.engine.requests[0]
    assert request.max_new_tokens == 40
    assert "Be brief." in harness.tokenizer.decode(request.prompt_ids)


async def test_responses_stream_event_sequence(harness: Harness) -> None:
    harness.script("<think>Recall.</think>Paris is the capital.")
    async with harness.client() as client:
        response = await client.post("/v1/responses", json={"model": "tiny", "input": "Hi", "stream": True})
    events = named_events(response.text)
    names = [name for name, _ in events]
    assert names[:2] == ["response.created", "response.in_progress"]
    assert names[-1] == "response.completed"
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    assert all(data["type"] == name for name, data in events)
    text = "".join(d["delta"] for n, d in events if n == "response.output_text.delta")
    reasoning = "".join(d["delta"] for n, d in events if n == "response.reasoning_text.delta")
    assert (reasoning, text) == ("Recall.", "Paris is the capital.")
    final = events[-1][1]["response"]
    assert [item["type"] for item in final["output"]] == ["reasoning", "message"]
    assert final["usage"]["output_tokens"] == len(harness.engine.tokens)
    assert "[DONE]" not in response.text


async def test_responses_tool_call_stream_and_length(harness: Harness) -> None:
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER_TOOL["function"]["parameters"]}
    harness.script(TOOL_OUTPUT)
    async with harness.client() as client:
        streamed = await client.post(
            "/v1/responses", json={"model": "tiny", "input": "Weather?", "tools": [tool], "stream": True}
        )
        harness.script("a b c d e f g")
        cut = (
            await client.post("/v1/responses", json={"model": "tiny", "input": "x", "max_output_tokens": 2})
        ).json()
    events = named_events(streamed.text)
    final = events[-1][1]["response"]
    call = next(item for item in final["output"] if item["type"] == "function_call")
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Zürich"}
    assert any(name == "response.function_call_arguments.delta" for name, _ in events)
    assert cut["status"] == "incomplete"


async def test_responses_failure_mid_stream_is_response_failed(harness: Harness) -> None:
    harness.script("Paris is the capital of France.", fail_after=2)
    async with harness.client() as client:
        response = await client.post("/v1/responses", json={"model": "tiny", "input": "Hi", "stream": True})
    name, data = named_events(response.text)[-1]
    assert name == "response.failed"
    assert "illegal memory access" in data["response"]["error"]["message"]


async def test_responses_refusals_are_plain_errors(harness: Harness) -> None:
    async with harness.client() as client:
        chained = await client.post(
            "/v1/responses",
            json={"model": "tiny", "input": "x", "previous_response_id": "resp_1", "stream": True},
        )
        unknown = await client.post("/v1/responses", json={"model": "nope", "input": "x"})
    assert chained.status_code == 400 and chained.json()["error"]["param"] == "previous_response_id"
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


async def test_openai_sdk_responses_in_process(harness: Harness) -> None:
    harness.script("Paris is the capital.")
    async with harness.client() as http:
        client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=http)
        answer = await client.responses.create(model="tiny", input="Capital of France?")
        stream = await client.responses.create(model="tiny", input="Capital of France?", stream=True)
        deltas = [event.delta async for event in stream if event.type == "response.output_text.delta"]
    assert answer.output_text == "".join(deltas) == "Paris is the capital."


async def test_an_unloaded_model_is_not_kept_alive_by_the_routes(harness: Harness) -> None:
    import gc
    import weakref

    harness.script("ok")
    async with harness.client() as client:
        assert (await client.post("/v1/chat/completions", json=chat())).status_code == 200
    gone = weakref.ref(harness.models.pop("tiny"))
    gc.collect()
    assert gone() is None
    async with harness.client() as client:
        assert (await client.post("/v1/chat/completions", json=chat())).status_code == 404


async def test_templating_and_tokenising_leave_the_event_loop_free(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prompt that takes long to prepare holds only its own request: others are answered."""
    import threading

    from neuron.serving import chat_endpoint

    entered, release = threading.Event(), threading.Event()
    real_prepare = chat_endpoint.prepare_chat

    def slow_prepare(*args: Any, **kwargs: Any) -> Any:
        if "slow" in str(args[1].messages[0].content):
            entered.set()
            # On the event loop this wait would freeze every request below (and this test).
            if not release.wait(HANG_GUARD_SECS):
                raise AssertionError("never released")
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(chat_endpoint, "prepare_chat", slow_prepare)
    harness.script("Paris.")
    async with harness.client() as client:
        slow = asyncio.create_task(client.post("/v1/chat/completions", json=chat("slow")))
        await asyncio.to_thread(entered.wait, HANG_GUARD_SECS)
        quick = await client.post("/v1/chat/completions", json=chat("quick"))
        counted = await client.post("/v1/chat/count_tokens", json=chat("quick"))
        assert not slow.done()
        release.set()
        assert (await slow).status_code == 200
    assert quick.status_code == 200 and counted.status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/chat/completions", chat(response_format=UNENFORCEABLE_FORMAT), "response_format"),
        (
            "/v1/responses",
            {
                "model": "tiny",
                "input": "x",
                "text": {"format": {"type": "json_schema", "name": "x", "schema": UNENFORCEABLE_SCHEMA}},
            },
            "text.format",
        ),
    ],
)
async def test_refusals_name_the_field_the_caller_sent(
    harness: Harness, path: str, body: dict[str, Any], field: str
) -> None:
    async with harness.client() as client:
        response = await client.post(path, json=body)
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == field
    assert error["message"].startswith(field + ": ") and "not" in error["message"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", chat(max_tokens=5000)),
        ("/v1/chat/completions", chat(max_tokens=5000, stream=True)),
        ("/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 5000}),
        ("/v1/responses", {"model": "tiny", "input": "Hi", "max_output_tokens": 5000}),
    ],
)
async def test_clamp_header_lowers_max_tokens_and_says_so(
    harness: Harness, path: str, body: dict[str, Any]
) -> None:
    harness.script("Paris.")
    async with harness.client() as client:
        refused = await client.post(path, json=body)
        clamped = await client.post(path, json=body, headers={"x-cortex-clamp-max-tokens": "true"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
    assert clamped.status_code == 200, clamped.text
    used = int(clamped.headers["x-cortex-max-tokens-clamped"])
    assert used == harness.engine.requests[-1].max_new_tokens < 5000


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/chat/completions", {"model": "tiny", "messages": []}, "messages"),
        ("/v1/chat/count_tokens", {"model": "tiny", "messages": []}, "messages"),
        ("/v1/responses", {"model": "tiny", "input": []}, "input"),
    ],
)
async def test_an_empty_conversation_is_a_400_naming_its_field(
    harness: Harness, route: str, body: dict[str, Any], param: str
) -> None:
    async with harness.client() as client:
        response = await client.post(route, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and "at least one message" in error["message"]
    assert harness.engine.requests == []
