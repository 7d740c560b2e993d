"""Images through the neuron app (real manager, real engine, tiny Qwen3.5 vision checkpoint):
the answer equals transformers' generate() on the template transformers renders, usage and
count_tokens count the image tokens, /models reports what the model can do, and a bad
image is a 400 that says which and why while the neuron keeps serving."""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from support.engine_harness import eos_ids
from support.in_process_neuron import InProcessNeuron, serving
from support.local_models import neuron_config
from support.vision import data_uri, picture, plain, png_bytes, reference_vision_greedy

from cortex_core.config.neuron import VisionConfig
from neuron.vision.prepare import ImageLimits, ImagePreparer

# 8 merged 32x32 patches at most per image: big pictures shrink to at most 8 tokens.
VISION = VisionConfig(max_pixels=8 * 1024, max_image_bytes=60_000)


@pytest.fixture(scope="module")
async def node(tiny_qwen3_5_vision: Path) -> AsyncIterator[InProcessNeuron]:
    async with serving(tiny_qwen3_5_vision, neuron_config(vision=VISION)) as node:
        yield node


def user(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(parts)}]


def image_part(image: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": data_uri(image)}}


async def test_an_image_answer_equals_generate_and_usage_counts_its_tokens(
    node: InProcessNeuron, tiny_qwen3_5_vision: Path
) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    image = picture(7, 90, 70)
    model_id = str(tiny_qwen3_5_vision)
    messages = user({"type": "text", "text": "What is this?"}, image_part(image))
    body = {"model": model_id, "messages": messages, "max_tokens": 12, "temperature": 0}
    response = await node.client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()

    # The reference: transformers renders the template, the model's processor makes the pixels.
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen3_5_vision, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3_5_vision)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image"}]}],
        tokenize=False,
        add_generation_prompt=True,
        # The neuron's default unless the client asks for thinking (neuron.md §13.8).
        enable_thinking=False,
    )
    limits = ImageLimits(max_pixels=VISION.max_pixels, max_source_pixels=1 << 24, max_images=4)
    preparer = ImagePreparer.from_checkpoint(tiny_qwen3_5_vision, model.config, limits)
    ids, images = preparer.attach(tokenizer.encode(rendered, add_special_tokens=False), [image], "ref")
    tokens, finish = reference_vision_greedy(model, images, 12, eos_ids(model))
    assert answer["usage"]["prompt_tokens"] == len(ids)
    assert answer["choices"][0]["message"]["content"] == tokenizer.decode(tokens, skip_special_tokens=True)
    assert answer["choices"][0]["finish_reason"] == finish
    assert images.image_tokens == 6  # 64x96 pixels after resizing: 2x3 merged patches

    counted = await node.client.post("/v1/chat/count_tokens", json={"model": model_id, "messages": messages})
    assert counted.json() == {"input_tokens": len(ids)}


async def test_responses_input_image_is_served_and_counted(
    node: InProcessNeuron, tiny_qwen3_5_vision: Path
) -> None:
    async def respond(*parts: dict[str, Any]) -> dict[str, Any]:
        body = {
            "model": str(tiny_qwen3_5_vision),
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "What is this?"}, *parts]}],
            "max_output_tokens": 4,
        }
        response = await node.client.post("/v1/responses", json=body)
        assert response.status_code == 200, response.text
        return dict(response.json())

    with_image = await respond({"type": "input_image", "image_url": data_uri(picture(7, 90, 70))})
    text_only = await respond()
    # The markers around the image, and its 2x3 merged patches.
    assert with_image["usage"]["input_tokens"] - text_only["usage"]["input_tokens"] == 2 + 6


async def test_max_pixels_caps_a_big_image(node: InProcessNeuron, tiny_qwen3_5_vision: Path) -> None:
    async def count(*parts: dict[str, Any]) -> int:
        body = {"model": str(tiny_qwen3_5_vision), "messages": user(*parts)}
        return int((await node.client.post("/v1/chat/count_tokens", json=body)).json()["input_tokens"])

    text = await count({"type": "text", "text": "Look"})
    # 130x60 rounds to 128x64 pixels, right at the cap: 4x2 merged patches, plus the vision
    # start and end markers.
    assert await count({"type": "text", "text": "Look"}, image_part(picture(8, 130, 60))) - text == 2 + 8
    # 1000x1000 would be 16 tokens under the checkpoint's own limit; max_pixels (8 x 32x32)
    # shrinks it to 64x64: 2x2.
    assert await count({"type": "text", "text": "Look"}, image_part(plain(1000, 1000))) - text == 2 + 4


async def test_models_report_capabilities_derived_from_the_model(
    node: InProcessNeuron, tiny_qwen3_5_vision: Path
) -> None:
    models = (await node.client.get("/models")).json()
    info = next(m for m in models if m["id"] == str(tiny_qwen3_5_vision))
    assert info["capabilities"] == ["text", "vision", "tool_call", "reasoning"]
    assert (info["tool_call"], info["reasoning"]) == (True, True)


@pytest.mark.parametrize(
    ("url", "code", "reason"),
    [
        ("data:image/png;base64,iVBORw0KGgoAAAAN", "image_invalid", "not a decodable image"),
        ("data:image/png;base64,%%%", "image_invalid", "not valid base64"),
        ("http://images.example/cat.png", "image_refused", "vision.fetch_urls is off"),
    ],
)
async def test_a_bad_image_is_a_400_naming_it_and_the_neuron_keeps_serving(
    node: InProcessNeuron, tiny_qwen3_5_vision: Path, url: str, code: str, reason: str
) -> None:
    model_id = str(tiny_qwen3_5_vision)
    bad = {"type": "image_url", "image_url": {"url": url}}
    body = {"model": model_id, "messages": user({"type": "text", "text": "Hi"}, bad), "max_tokens": 2}
    response = await node.client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, "messages[0].content[1].image_url")
    assert reason in error["message"]
    good = {**body, "messages": user({"type": "text", "text": "Hi"}, image_part(picture(1, 40, 40)))}
    assert (await node.client.post("/v1/chat/completions", json=good)).status_code == 200


async def test_an_oversized_image_is_refused(node: InProcessNeuron, tiny_qwen3_5_vision: Path) -> None:
    noisy = picture(5, 300, 300)  # random pixels compress badly: ~270 KB of PNG
    assert len(png_bytes(noisy)) > VISION.max_image_bytes
    body = {"model": str(tiny_qwen3_5_vision), "messages": user(image_part(noisy)), "max_tokens": 2}
    response = await node.client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "image_too_large"
    assert "larger than the 60000-byte limit" in error["message"]


async def test_an_image_the_processor_cannot_resize_and_too_many_images_are_refused(
    node: InProcessNeuron, tiny_qwen3_5_vision: Path
) -> None:
    model_id = str(tiny_qwen3_5_vision)
    sliver = plain(4000, 10)  # an aspect ratio of 400: beyond what Qwen's resizing accepts
    body = {
        "model": model_id,
        "messages": user(image_part(picture(1, 40, 40)), image_part(sliver)),
        "max_tokens": 2,
    }
    response = await node.client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("image_invalid", "messages[0].content[1].image_url")
    assert "the model's image processor refused it" in error["message"]

    many = [image_part(plain(40, 40)) for _ in range(VISION.max_images + 1)]
    response = await node.client.post(
        "/v1/chat/count_tokens", json={"model": model_id, "messages": user(*many)}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "too_many_images"
    assert f"more than vision.max_images ({VISION.max_images})" in response.json()["error"]["message"]


def test_an_allowed_image_url_becomes_the_same_tokens_as_its_data_uri(tiny_qwen3_5_vision: Path) -> None:
    """The whole preparation with URL fetching on: the allow-listed host is fetched through
    the guard (FakeNetwork maps it to a local server), decoded and processed, and gives the
    prompt and pixels the same picture gives as a data URI; a redirect to a private address
    in the same request is refused by name."""
    from support.image_server import PNG, PUBLIC, FakeNetwork, image_server
    from transformers import AutoConfig

    from neuron.vision.refs import ImageRef
    from neuron.vision.sources import FetchPolicy, ImageFetcher, ImageRefused

    config = AutoConfig.from_pretrained(tiny_qwen3_5_vision)
    limits = ImageLimits(max_pixels=VISION.max_pixels, max_source_pixels=1 << 24, max_images=4)
    placeholder = int(config.image_token_id)
    prompt = [5, placeholder, 6]
    with image_server() as port:
        network = FakeNetwork(port)
        policy = FetchPolicy(
            fetch_urls=True, allowed_hosts=frozenset({"images.test", "inside.test"}), network=network
        )
        preparer = ImagePreparer.from_checkpoint(
            tiny_qwen3_5_vision, config, limits, fetcher=ImageFetcher(policy)
        )
        by_url = preparer.prepare(prompt, [ImageRef("http://images.test/cat.png", "img")], "tiny")
        data = "data:image/png;base64," + base64.b64encode(PNG).decode()
        by_data = preparer.prepare(prompt, [ImageRef(data, "img")], "tiny")
        with pytest.raises(ImageRefused, match=re.escape("second: host 'inside.test' resolves to 10.1.2.3")):
            preparer.prepare(
                [*prompt, placeholder],
                [ImageRef(data, "first"), ImageRef("http://images.test/to-private", "second")],
                "tiny",
            )
    assert by_url[0] == by_data[0] and by_url[1].digests == by_data[1].digests
    assert by_url[1].image_tokens == 1  # 20x20 pixels: the processor's minimum, one merged patch
    assert network.connected == [PUBLIC, PUBLIC]


async def test_several_choices_of_an_image_request_each_see_the_image(tiny_vision: Path) -> None:
    """n > 1 forks the prompt's K/V (or, on a hybrid model, queues each choice on its own):
    a fork that recomputes the prompt's tail must still see the image's features."""
    async with serving(tiny_vision, neuron_config(vision=VISION)) as node:
        messages = user({"type": "text", "text": "What is this?"}, image_part(picture(3, 80, 60)))
        body = {"model": str(tiny_vision), "messages": messages, "max_tokens": 10, "temperature": 0}
        single = (await node.client.post("/v1/chat/completions", json=body)).json()
        several = (await node.client.post("/v1/chat/completions", json={**body, "n": 3})).json()
    expected = single["choices"][0]["message"]["content"]
    assert [c["message"]["content"] for c in several["choices"]] == [expected] * 3
    assert several["usage"]["prompt_tokens"] == single["usage"]["prompt_tokens"]
