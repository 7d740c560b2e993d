"""Admission: a request body is decoded into its dialect's type before any placement.

A body the neuron would refuse must be refused here, at the gateway, before the router
places it: otherwise a malformed request for a cold model triggers a cold load (and the
evictions that make room for it) only to get a 400 afterwards. The decode is one msgspec
pass into the same wire types the neuron decodes into; the decoded value is used only for
its `model` — the proxy relays the client's bytes untouched.
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from cortex_core.errors import ApiError, bad_request
from cortex_core.openai.chat import ChatCompletionRequest
from cortex_core.openai.completions import CompletionRequest
from cortex_core.openai.responses import ResponsesRequest
from cortex_core.validation import dotted, json_check, locate_invalid


class _HasModel(Protocol):
    model: str


# One decoder per OpenAI route: msgspec builds the validator once, not per request.
_DECODERS: dict[str, msgspec.json.Decoder[ChatCompletionRequest | CompletionRequest | ResponsesRequest]] = {
    "/v1/chat/completions": msgspec.json.Decoder(ChatCompletionRequest),
    "/v1/completions": msgspec.json.Decoder(CompletionRequest),
    "/v1/responses": msgspec.json.Decoder(ResponsesRequest),
}

OPENAI_PATHS = tuple(_DECODERS)


def admitted_model(path: str, body: bytes) -> str:
    """The `model` of a valid OpenAI request body for `path`; a 400 naming the problem otherwise."""
    decoder = _DECODERS[path]
    if not body.strip():
        raise bad_request("request body is empty; expected a JSON object", code="malformed_json")
    try:
        request: _HasModel = decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise _invalid(body, decoder.type, str(exc)) from exc
    except msgspec.DecodeError as exc:
        raise bad_request(f"request body is not valid JSON: {exc}", code="malformed_json") from exc
    if isinstance(request, ChatCompletionRequest) and not request.messages:
        # A template would render just the generation prompt and the model would answer nothing.
        raise bad_request("messages: at least one message is required", param="messages")
    return request.model


def _invalid(body: bytes, into: object, text: str) -> ApiError:
    # The field is found by walking the type (cortex_core.validation), and becomes `param`
    # as `messages[0].content`. A missing or mistyped `model` keeps its own code, since
    # clients (and the SDKs' tests) treat it differently from a problem inside the
    # conversation.
    try:
        document = msgspec.json.decode(body)
    except msgspec.DecodeError:
        # Validation failed before a syntax error later in the body: no location to give.
        document = None
    found = locate_invalid(document, into, json_check) if document is not None else None
    path = found.path if found is not None else ()
    model_missing = not path and isinstance(document, dict) and "model" not in document
    if path == ("model",) or model_missing:
        return bad_request(
            f"missing or invalid 'model' field in request body: {text}",
            code="missing_model_field",
            param="model",
        )
    return bad_request(f"invalid request body: {text}", param=dotted(path) or None)
