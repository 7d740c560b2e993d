"""Error envelopes for both dialects, and the one exception type that carries them.

Code anywhere raises `ApiError`; the HTTP edge (gateway or neuron) renders it once, in the
caller's dialect: OpenAI's `{"error": {...}}` or Anthropic's `{"type": "error", ...}`.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from cortex_core.validation import json_path, locate_in_json

T = TypeVar("T")

# Anthropic names errors by kind, not by HTTP status; this is its documented mapping.
_ANTHROPIC_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}

_OPENAI_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class ApiError(Exception):
    """A failure that reaches a client: HTTP status, a message a user can act on, and codes."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
        extras: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _OPENAI_TYPE_BY_STATUS.get(status, "api_error")
        self.code = code
        self.param = param
        self.retry_after = retry_after
        self.extras = extras or {}

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"retry-after": str(max(1, round(self.retry_after)))}

    def openai_body(self) -> dict[str, Any]:
        detail: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.code,
        }
        detail.update(self.extras)
        return {"error": detail}

    def anthropic_body(self, request_id: str | None = None) -> dict[str, Any]:
        """Anthropic's envelope; its API names the request in the body too (`request_id`)."""
        kind = _ANTHROPIC_TYPE_BY_STATUS.get(self.status, "api_error")
        body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": self.message}}
        if request_id is not None:
            body["request_id"] = request_id
        return body

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.message!r}, code={self.code!r})"


def unexpected_error(exc: BaseException) -> ApiError:
    """A failure no code anticipated, as the 500 a client gets: its kind, not its details."""
    return ApiError(
        500, f"internal error ({type(exc).__name__}); the server logged the details", code="internal_error"
    )


def bad_request(message: str, *, code: str = "invalid_request_body", param: str | None = None) -> ApiError:
    return ApiError(400, message, type="invalid_request_error", code=code, param=param)


def decode_json_body(body: bytes, into: type[T]) -> T:
    """Decode a request body into a wire type; an error names the field path and the expectation.

    msgspec's messages already read like ``Expected `str`, got `int` - at `$.messages[0].content```;
    the field's JSON path is `param`, so clients can point at it. The path is found by
    walking the type (cortex_core.validation), not read back out of msgspec's message.
    """
    if not body.strip():
        raise bad_request("request body is empty; expected a JSON object", code="malformed_json")
    try:
        return msgspec.json.decode(body, type=into)
    except msgspec.ValidationError as exc:
        invalid = locate_in_json(body, into)
        path = json_path(invalid.path) if invalid is not None else None
        raise bad_request(f"invalid request body: {exc}", param=path) from exc
    except msgspec.DecodeError as exc:
        raise bad_request(f"request body is not valid JSON: {exc}", code="malformed_json") from exc
