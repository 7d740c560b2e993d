"""Structured outputs end to end: the official SDKs → a real gateway → a real neuron running a
tiny random-weight Qwen3, whose free output is gibberish.

Whatever such a model would say, `chat.completions.parse`, `responses.parse` and forced tool
calls must come back parseable and valid, streamed or not, while free requests share the
batch. Both apps are served by hypercorn on loopback in this process, once for the module.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anthropic
import httpx2
import msgspec
import openai
import pytest
import pytest_asyncio
from pydantic import BaseModel, ConfigDict, Field
from support.fake_upstream import on_hypercorn
from support.local_models import neuron_config

from cortex_core.config.catalogue import ModelCatalogue, ModelProfile
from cortex_core.config.gateway import GatewayConfig
from cortex_gateway.app import create_app as create_gateway
from neuron.app import create_app as create_neuron
from neuron.discovery import HostProbe

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

# Each request's own sampling: a random model at temperature 1 takes many paths.
TEMPERATURE = 1.0
MAX_TOKENS = 160


class City(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=16)
    population: int = Field(ge=0, le=10_000_000)
    coastal: bool
    tags: list[Literal["old", "big", "cold"]] = Field(max_length=3)


class Weather(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=12)
    unit: Literal["celsius", "fahrenheit"]


WEATHER_SCHEMA = Weather.model_json_schema()
OPENAI_TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}},
    {"type": "function", "function": {"name": "get_time"}},
]
ANTHROPIC_TOOLS: list[Any] = [
    {"name": "get_weather", "input_schema": WEATHER_SCHEMA},
    {"name": "get_time", "input_schema": {"type": "object", "properties": {}, "additionalProperties": False}},
]


@dataclass
class Stack:
    model: str
    openai: openai.AsyncOpenAI
    anthropic: anthropic.AsyncAnthropic


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tiny_qwen3: Path) -> AsyncIterator[Stack]:
    model = str(tiny_qwen3)
    neuron = create_neuron(
        neuron_config(),
        probe=HostProbe(None, cuda_unavailable_reason="test host: CPU only"),
        activate_defaults=False,
    )
    async with on_hypercorn(neuron) as neuron_url:
        config = msgspec.convert({"neurons": [{"name": "n", "endpoint": neuron_url}]}, GatewayConfig)
        gateway = create_gateway(config, ModelCatalogue([ModelProfile(id=model)], {}), run_poller=False)
        async with on_hypercorn(gateway) as url, httpx2.AsyncClient(base_url=url, timeout=120) as http:
            await gateway.state.poller.poll_once()
            loaded = await http.post("/admin/models/load", json={"model": model})
            assert loaded.status_code == 200, loaded.text
            yield Stack(
                model,
                openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", timeout=120, max_retries=0),
                anthropic.AsyncAnthropic(base_url=url, api_key="none", timeout=120, max_retries=0),
            )


def ask(index: int) -> list[Any]:
    return [{"role": "user", "content": f"Describe city number {index} as JSON."}]


async def parsed_chat(stack: Stack, index: int) -> City:
    completion = await stack.openai.chat.completions.parse(
        model=stack.model,
        messages=ask(index),
        response_format=City,
        temperature=TEMPERATURE,
        max_tokens=MAX_TOKENS,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert choice.message.parsed is not None
    return choice.message.parsed


async def streamed_chat(stack: Stack, index: int) -> City:
    async with stack.openai.chat.completions.stream(
        model=stack.model,
        messages=ask(index),
        response_format=City,
        temperature=TEMPERATURE,
        max_tokens=MAX_TOKENS,
    ) as stream:
        completion = await stream.get_final_completion()
    parsed = completion.choices[0].message.parsed
    assert parsed is not None, completion.choices[0].message.content
    return parsed


async def parsed_response(stack: Stack, index: int) -> City:
    response = await stack.openai.responses.parse(
        model=stack.model,
        input=f"Describe city number {index} as JSON.",
        text_format=City,
        temperature=TEMPERATURE,
        max_output_tokens=MAX_TOKENS,
        # The template would leave thinking on, and a random model rarely ends its reasoning.
        reasoning={"effort": "none"},
    )
    assert response.output_parsed is not None, response.output_text
    return response.output_parsed


async def free_chat(stack: Stack, index: int) -> str:
    completion = await stack.openai.chat.completions.create(
        model=stack.model, messages=ask(index), temperature=TEMPERATURE, max_tokens=24
    )
    return completion.choices[0].message.content or ""


async def test_fifty_structured_answers_all_parse_beside_free_requests(stack: Stack) -> None:
    structured = [
        *(parsed_chat(stack, i) for i in range(20)),
        *(streamed_chat(stack, i) for i in range(20, 35)),
        *(parsed_response(stack, i) for i in range(35, 50)),
    ]
    free = [free_chat(stack, i) for i in range(8)]
    results = await asyncio.gather(*structured, *free)
    cities = results[:50]
    assert all(isinstance(city, City) for city in cities)
    # Not one fixed answer: the grammar constrains, the model still chooses.
    assert len({city.model_dump_json() for city in cities}) > 10
    assert all(isinstance(text, str) for text in results[50:])


async def anthropic_message(stack: Stack, kwargs: dict[str, Any], *, stream: bool) -> anthropic.types.Message:
    """The SDK's message for one request: from one create, or assembled from its stream."""
    if not stream:
        return await stack.anthropic.messages.create(**kwargs)
    async with stack.anthropic.messages.stream(**kwargs) as events:
        return await events.get_final_message()


# `required` / `any` allow several calls (test_serving_structured walks those grammars), and
# after each one a random model may well start another until max_tokens: one call here.


async def test_anthropic_output_config_format_parses(stack: Stack) -> None:
    async def one(index: int, stream: bool) -> City:
        kwargs: dict[str, Any] = {
            "model": stack.model,
            "max_tokens": MAX_TOKENS,
            "messages": ask(index),
            "extra_body": {
                "output_config": {"format": {"type": "json_schema", "schema": City.model_json_schema()}}
            },
        }
        message = await anthropic_message(stack, kwargs, stream=stream)
        assert message.stop_reason == "end_turn"
        (block,) = message.content
        assert block.type == "text"
        return City.model_validate_json(block.text)

    cities = await asyncio.gather(*(one(i, stream=i % 2 == 1) for i in range(6)))
    assert all(isinstance(city, City) for city in cities)


async def openai_forced_calls(stack: Stack, tool_choice: Any, *, stream: bool) -> list[tuple[str, str]]:
    kwargs: dict[str, Any] = {
        "model": stack.model,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": OPENAI_TOOLS,
        "tool_choice": tool_choice,
        "parallel_tool_calls": False,
        "temperature": TEMPERATURE,
        "max_tokens": MAX_TOKENS,
    }
    if not stream:
        completion = await stack.openai.chat.completions.create(**kwargs)
        calls = completion.choices[0].message.tool_calls or []
        return [(call.function.name, call.function.arguments) for call in calls]  # type: ignore[union-attr]
    async with stack.openai.chat.completions.stream(**kwargs) as events:
        final = await events.get_final_completion()
    calls = final.choices[0].message.tool_calls or []
    return [(call.function.name, call.function.arguments) for call in calls]


async def anthropic_forced_calls(stack: Stack, tool_choice: Any, *, stream: bool) -> list[tuple[str, str]]:
    kwargs: dict[str, Any] = {
        "model": stack.model,
        "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": ANTHROPIC_TOOLS,
        "tool_choice": tool_choice,
    }
    message = await anthropic_message(stack, kwargs, stream=stream)
    assert message.stop_reason == "tool_use"
    return [(block.name, json.dumps(block.input)) for block in message.content if block.type == "tool_use"]


def assert_valid(calls: list[tuple[str, str]], allowed: set[str]) -> None:
    assert calls
    for name, arguments in calls:
        assert name in allowed
        if name == "get_weather":
            Weather.model_validate_json(arguments)
        else:
            assert json.loads(arguments) == {}


@pytest.mark.parametrize("stream", [False, True])
async def test_forced_tool_calls_always_parse_and_validate(stack: Stack, stream: bool) -> None:
    named_openai = {"type": "function", "function": {"name": "get_weather"}}
    named_anthropic = {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
    runs = [
        *(openai_forced_calls(stack, named_openai, stream=stream) for _ in range(4)),
        *(openai_forced_calls(stack, "required", stream=stream) for _ in range(4)),
        *(anthropic_forced_calls(stack, named_anthropic, stream=stream) for _ in range(4)),
        *(
            anthropic_forced_calls(stack, {"type": "any", "disable_parallel_tool_use": True}, stream=stream)
            for _ in range(4)
        ),
    ]
    results = await asyncio.gather(*runs)
    for index, calls in enumerate(results):
        named = index % 8 < 4
        assert_valid(calls, {"get_weather"} if named else {"get_weather", "get_time"})
        assert len(calls) == 1


async def test_an_unenforceable_schema_is_a_400_in_each_dialect(stack: Stack) -> None:
    schema = {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}
    with pytest.raises(openai.BadRequestError) as chat:
        await stack.openai.chat.completions.create(
            model=stack.model,
            messages=ask(0),
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
    assert chat.value.code == "unsupported_schema" and "response_format: " in str(chat.value.message)
    with pytest.raises(anthropic.BadRequestError) as messages:
        await stack.anthropic.messages.create(
            model=stack.model,
            max_tokens=16,
            messages=ask(0),
            extra_body={"output_config": {"format": {"type": "json_schema", "schema": schema}}},
        )
    assert messages.value.body["error"]["message"].startswith("output_config.format: ")  # type: ignore[index]
