"""End to end on loopback: the official SDKs send an image → a real gateway process → a real
`neuron serve` process that loads the tiny Qwen3.5 vision checkpoint from a folder.

Both dialects get a 200 whose usage counts the image tokens (the picture below is 2x3
merged patches, plus the vision start and end markers), the gateway's /v1/models says the
model takes images, and a corrupt image is the caller's dialect's 400, saying why.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from support.processes import Fleet, local_fleet
from support.vision import data_uri, picture, png_bytes

pytestmark = pytest.mark.slow

IMAGE = picture(7, 90, 70)
IMAGE_TOKENS = 2 + 6
QUESTION = "What is in this picture?"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, tiny_qwen3_5_vision: Path) -> Iterator[Fleet]:
    with local_fleet(tmp_path_factory.mktemp("vision-sdks"), str(tiny_qwen3_5_vision)) as fleet:
        yield fleet


def openai_client(fleet: Fleet) -> openai.OpenAI:
    return openai.OpenAI(base_url=fleet.gateway_url + "/v1", api_key="x", max_retries=0, timeout=120)


def anthropic_client(fleet: Fleet) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=fleet.gateway_url, api_key="x", max_retries=0, timeout=120)


def test_the_gateway_lists_the_model_as_vision_capable(fleet: Fleet) -> None:
    with httpx2.Client(base_url=fleet.gateway_url, timeout=30) as client:
        entry = client.get(f"/v1/models/{fleet.model_id}").json()
    assert "vision" in entry["capabilities"]
    assert entry["tool_call"] is True and entry["reasoning"] is True


def test_openai_sdk_sends_a_data_uri_image(fleet: Fleet) -> None:
    client = openai_client(fleet)

    def ask(*parts: Any) -> Any:
        content = [{"type": "text", "text": QUESTION}, *parts]
        return client.chat.completions.create(
            model=fleet.model_id, messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0
        )

    with_image = ask({"type": "image_url", "image_url": {"url": data_uri(IMAGE)}})
    text_only = ask()
    assert with_image.choices[0].finish_reason in ("stop", "length")
    assert with_image.usage is not None and text_only.usage is not None
    assert with_image.usage.prompt_tokens - text_only.usage.prompt_tokens == IMAGE_TOKENS


def test_anthropic_sdk_sends_a_base64_image_and_counts_it(fleet: Fleet) -> None:
    client = anthropic_client(fleet)
    image_block = {
        "type": "image",
        "source": {
            "type": "base64",
            "media_type": "image/png",
            "data": base64.b64encode(png_bytes(IMAGE)).decode(),
        },
    }
    messages: Any = [{"role": "user", "content": [image_block, {"type": "text", "text": QUESTION}]}]
    message = client.messages.create(
        model=fleet.model_id, max_tokens=8, messages=messages, extra_body={"temperature": 0}
    )
    assert message.stop_reason in ("end_turn", "max_tokens")
    counted = client.messages.count_tokens(model=fleet.model_id, messages=messages)
    assert message.usage.input_tokens == counted.input_tokens
    text_only = client.messages.count_tokens(
        model=fleet.model_id, messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    )
    assert counted.input_tokens - text_only.input_tokens == IMAGE_TOKENS


def anthropic_refusal(fleet: Fleet, source: dict[str, Any]) -> anthropic.BadRequestError:
    """The Anthropic SDK's error for a message whose one image has this `source`."""
    image = {"type": "image", "source": source}
    with pytest.raises(anthropic.BadRequestError) as refused:
        anthropic_client(fleet).messages.create(
            model=fleet.model_id, max_tokens=4, messages=[{"role": "user", "content": [image]}]
        )
    return refused.value


def test_a_corrupt_image_is_a_400_in_each_dialect_and_the_neuron_keeps_serving(fleet: Fleet) -> None:
    corrupt = base64.b64encode(b"\x89PNG\r\n\x1a\n not really").decode()
    from_anthropic = anthropic_refusal(fleet, {"type": "base64", "media_type": "image/png", "data": corrupt})
    assert "not a decodable image" in str(from_anthropic)
    assert from_anthropic.body["type"] == "error"  # type: ignore[index]
    # An Anthropic `url` image: this neuron fetches none (vision.fetch_urls is off by default).
    by_url = anthropic_refusal(fleet, {"type": "url", "url": "http://169.254.169.254/x.png"})
    assert "vision.fetch_urls is off" in str(by_url)
    with pytest.raises(openai.BadRequestError) as from_openai:
        openai_client(fleet).chat.completions.create(
            model=fleet.model_id,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + corrupt}}
                    ],
                }
            ],
            max_tokens=4,
        )
    assert from_openai.value.code == "image_invalid"
    assert "messages[0].content[0].image_url" in str(from_openai.value)
    again = openai_client(fleet).chat.completions.create(
        model=fleet.model_id, messages=[{"role": "user", "content": QUESTION}], max_tokens=2
    )
    assert again.choices[0].finish_reason in ("stop", "length")
