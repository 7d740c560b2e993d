"""Chat template rendering: HF parity on the tiny Qwen3 template, copies, errors, fallback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from cortex_core.errors import ApiError
from neuron.serving.template import ChatTemplate, template_messages

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city, e.g. <Zürich> & 'Bern'",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}

CONVERSATIONS: list[tuple[str, list[dict[str, Any]], dict[str, Any]]] = [
    ("simple", [{"role": "user", "content": "Hi"}], {}),
    (
        "system-multi-turn",
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Capital of France?"},
        ],
        {},
    ),
    ("thinking-off", [{"role": "user", "content": "Hi"}], {"enable_thinking": False}),
    (
        "tools-and-history",
        [
            {"role": "user", "content": "Weather in Zürich?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "12 °C & sunny"},
        ],
        {"tools": [WEATHER_TOOL]},
    ),
    (
        "text-parts",
        [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        {},
    ),
]


def hf_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What transformers is given for the same conversation (args as objects, parts joined)."""
    out = []
    for message in messages:
        message = dict(message)
        if isinstance(message.get("content"), list):
            message["content"] = "\n".join(part["text"] for part in message["content"])
        if message.get("content") is None:
            message["content"] = ""
        if "tool_calls" in message:
            message["tool_calls"] = [
                {
                    **call,
                    "function": {**call["function"], "arguments": json.loads(call["function"]["arguments"])},
                }
                for call in message["tool_calls"]
            ]
        out.append(message)
    return out


@pytest.fixture(scope="module")
def qwen_tokenizer(tiny_qwen3: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_qwen3)


@pytest.mark.parametrize(("name", "messages", "extra"), CONVERSATIONS, ids=[c[0] for c in CONVERSATIONS])
def test_renders_like_transformers(
    qwen_tokenizer: Any, name: str, messages: list[dict[str, Any]], extra: dict[str, Any]
) -> None:
    tools = extra.get("tools")
    kwargs = {k: v for k, v in extra.items() if k != "tools"}
    template = ChatTemplate.for_tokenizer("tiny", qwen_tokenizer.chat_template, qwen_tokenizer)
    ours = template.render(template_messages(messages, "tiny"), tools=tools, template_kwargs=kwargs)
    theirs = qwen_tokenizer.apply_chat_template(
        hf_messages(messages), tools=tools, add_generation_prompt=True, tokenize=False, **kwargs
    )
    assert ours == theirs
    if tools:
        # tojson must not HTML-escape (minijinja's built-in would write \u003c).
        assert "<Zürich> & 'Bern'" in ours
        assert '"arguments": {"city": "Zürich"}' in ours
    if kwargs.get("enable_thinking") is False:
        assert ours.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_template_cannot_mutate_the_next_render() -> None:
    source = "{{ messages.pop() and '' }}{% for m in messages %}[{{ m.content }}]{% endfor %}"
    template = ChatTemplate("m", source, {})
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    first = template.render(messages)
    second = template.render(messages)
    assert first == second == "[a]"
    assert len(messages) == 2


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("{{ raise_exception('System role not supported') }}", "System role not supported"),
        ("{% for x in %}", "syntax error"),
    ],
)
def test_template_errors_are_400_naming_the_problem(source: str, fragment: str) -> None:
    with pytest.raises(ApiError) as caught:
        ChatTemplate("broken", source, {}).render([{"role": "user", "content": "hi"}])
    assert caught.value.status == 400
    assert caught.value.code == "template_render_failed"
    assert fragment in caught.value.message and "'broken'" in caught.value.message


def test_hf_helpers_are_available() -> None:
    source = (
        "{% generation %}{{ bos_token }}{{ {'a': '<&>'} | tojson(indent=2) }}{% endgeneration %}"
        "|{{ strftime_now('%Y') | length }}|{{ eos_token }}"
    )
    rendered = ChatTemplate("m", source, {"bos_token": "<s>", "eos_token": "</s>"}).render([])
    assert rendered == '<s>{\n  "a": "<&>"\n}|4|</s>'


def test_no_template_falls_back_to_chatml() -> None:
    template = ChatTemplate("m", None, {})
    assert template.is_fallback
    rendered = template.render([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert (
        rendered == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    )


def test_template_kwargs_override_defaults() -> None:
    template = ChatTemplate("m", None, {})
    rendered = template.render(
        [{"role": "user", "content": "U"}], template_kwargs={"add_generation_prompt": False}
    )
    assert not rendered.endswith("assistant\n")


def test_image_parts_on_text_model_are_refused() -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        }
    ]
    with pytest.raises(ApiError) as caught:
        template_messages(messages, "tiny")
    assert caught.value.status == 400 and caught.value.code == "vision_unsupported"
    assert caught.value.openai_body()["error"]["model_id"] == "tiny"
