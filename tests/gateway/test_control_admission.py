"""Admission: a body the neuron would refuse is refused before placement, so it never loads."""

from __future__ import annotations

import pytest
from support.fake_neuron import FakeNeuron, gateway

from cortex_core.config.catalogue import ModelCatalogue, ModelProfile
from cortex_core.errors import ApiError
from cortex_gateway.admission import admitted_model

CATALOGUE = ModelCatalogue(
    [ModelProfile(id="org/cold", vram_mb=20_000), ModelProfile(id="org/resident", vram_mb=20_000)], {}
)


@pytest.mark.parametrize(
    ("path", "body", "code", "param"),
    [
        (
            "/v1/chat/completions",
            b'{"model": "org/cold", "messages": "hi"}',
            "invalid_request_body",
            "messages",
        ),
        ("/v1/chat/completions", b'{"model": "org/cold"}', "invalid_request_body", None),
        ("/v1/chat/completions", b'{"messages": []}', "missing_model_field", "model"),
        ("/v1/chat/completions", b'{"model": 3, "messages": []}', "missing_model_field", "model"),
        ("/v1/chat/completions", b"not json", "malformed_json", None),
        ("/v1/chat/completions", b"  ", "malformed_json", None),
        ("/v1/completions", b'{"model": "org/cold", "prompt": {"a": 1}}', "invalid_request_body", "prompt"),
        ("/v1/responses", b'{"model": "org/cold", "input": 7}', "invalid_request_body", "input"),
        (
            "/v1/chat/completions",
            b'{"model": "org/cold", "messages": [], "temperature": "hot"}',
            "invalid_request_body",
            "temperature",
        ),
        (
            "/v1/chat/completions",
            b'{"model": "org/cold", "messages": []}',
            "invalid_request_body",
            "messages",
        ),
    ],
)
def test_an_invalid_body_is_a_400_naming_the_field(
    path: str, body: bytes, code: str, param: str | None
) -> None:
    with pytest.raises(ApiError) as caught:
        admitted_model(path, body)
    assert (caught.value.status, caught.value.code, caught.value.param) == (400, code, param)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'),
        ("/v1/completions", b'{"model": "m", "prompt": "once upon"}'),
        ("/v1/responses", b'{"model": "m", "input": "hello"}'),
    ],
)
def test_a_valid_body_gives_its_model(path: str, body: bytes) -> None:
    assert admitted_model(path, body) == "m"


async def test_a_malformed_body_for_a_cold_model_causes_no_load_and_no_eviction() -> None:
    a = FakeNeuron("a", devices_mb=[24_000], sizes_mb={"org/cold": 20_000, "org/resident": 20_000})
    a.preload("org/resident")
    async with gateway([a], CATALOGUE) as (_app, http):
        response = await http.post(
            "/v1/chat/completions", json={"model": "org/cold", "messages": [{"role": "user", "content": 5}]}
        )
        anthropic = await http.post(
            "/v1/messages", json={"model": "org/cold", "messages": "hi", "max_tokens": 5}
        )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages[0].content"
    assert anthropic.status_code == 400
    assert anthropic.json()["type"] == "error"
    assert (a.load_calls, a.unload_calls) == ([], [])
    assert set(a.models) == {"org/resident"}
