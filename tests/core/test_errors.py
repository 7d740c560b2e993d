"""Error envelopes in both dialects, and request-body decoding that names the bad field."""

from __future__ import annotations

import msgspec
import pytest

from cortex_core.errors import ApiError, decode_json_body


class Part(msgspec.Struct):
    type: str
    text: str


class Message(msgspec.Struct):
    role: str
    content: str | list[Part]


class Body(msgspec.Struct):
    model: str
    messages: list[Message]
    max_tokens: int | None = None


@pytest.mark.parametrize(
    ("status", "openai_type", "anthropic_type"),
    [
        (400, "invalid_request_error", "invalid_request_error"),
        (404, "invalid_request_error", "not_found_error"),
        (413, "invalid_request_error", "request_too_large"),
        (429, "rate_limit_error", "rate_limit_error"),
        (500, "api_error", "api_error"),
        (502, "api_error", "api_error"),
        (503, "api_error", "overloaded_error"),
    ],
)
def test_envelopes_per_status(status: int, openai_type: str, anthropic_type: str) -> None:
    error = ApiError(status, "something went wrong")
    assert error.openai_body() == {
        "error": {"message": "something went wrong", "type": openai_type, "param": None, "code": None}
    }
    assert error.anthropic_body() == {
        "type": "error",
        "error": {"type": anthropic_type, "message": "something went wrong"},
    }


def test_extras_sit_inside_the_error_and_retry_after_is_a_header() -> None:
    error = ApiError(
        503, "model is loading", code="model_loading", retry_after=2.4, extras={"model_id": "org/name"}
    )
    assert error.openai_body()["error"]["model_id"] == "org/name"
    assert error.openai_body()["error"]["code"] == "model_loading"
    assert error.headers() == {"retry-after": "2"}
    assert ApiError(503, "x", retry_after=0.1).headers() == {"retry-after": "1"}
    assert ApiError(400, "x").headers() == {}


def test_decode_valid_body() -> None:
    body = (
        b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "x": 1}'
    )
    decoded = decode_json_body(body, Body)
    assert decoded.messages[0].content == [Part(type="text", text="hi")]


@pytest.mark.parametrize(
    ("body", "code", "param", "fragment"),
    [
        (b"", "malformed_json", None, "empty"),
        (b"{not json", "malformed_json", None, "not valid JSON"),
        (b'{"messages": []}', "invalid_request_body", None, "missing required field `model`"),
        (b'{"model": 5, "messages": []}', "invalid_request_body", "$.model", "Expected `str`, got `int`"),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": 7}]}',
            "invalid_request_body",
            "$.messages[0].content",
            "got `int`",
        ),
        (
            b'{"model": "m", "messages": [], "max_tokens": "many"}',
            "invalid_request_body",
            "$.max_tokens",
            "got `str`",
        ),
    ],
)
def test_decode_errors_name_the_field(body: bytes, code: str, param: str | None, fragment: str) -> None:
    with pytest.raises(ApiError) as info:
        decode_json_body(body, Body)
    assert info.value.status == 400
    assert info.value.code == code
    assert info.value.param == param
    assert fragment in info.value.message
