"""A small blocking JSON client for the gateway's admin and list routes.

urllib from the standard library on purpose: `cortex status` must start in a fraction of a
second on a workstation that has neither aiohttp nor the SDKs imported (or installed).
"""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from typing import Any

DEFAULT_ENDPOINT = "http://127.0.0.1:31313"
API_KEY_ENV = "CORTEX_API_KEY"


class CliError(Exception):
    """Something the user must read; printed as one line, exit status 1."""


class GatewayUnreachable(CliError):
    pass


class GatewayError(CliError):
    """The gateway answered with an error status; the message comes from its error envelope."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


def error_message(body: bytes) -> str | None:
    """The `message` of an OpenAI or Anthropic error envelope, if the body is one."""
    try:
        decoded = json.loads(body)
    except ValueError:
        return None
    if isinstance(decoded, dict) and isinstance(decoded.get("error"), dict):
        message = decoded["error"].get("message")
        return str(message) if message is not None else None
    return None


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", exc)
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(reason, socket.gaierror):
        return f"unknown host ({reason.strerror})"
    return str(reason)


class GatewayClient:
    """`api_key` defaults to $CORTEX_API_KEY (sent as `Authorization: Bearer`; none when unset)."""

    def __init__(
        self, endpoint: str = DEFAULT_ENDPOINT, *, timeout: float = 5.0, api_key: str | None = None
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.timeout = timeout
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV, "")
        self._auth = {"authorization": f"Bearer {key.strip()}"} if key.strip() else {}

    def get(self, path: str) -> Any:
        return self._send(urllib.request.Request(self.endpoint + path, headers=self._auth, method="GET"))

    def post(self, path: str, body: dict[str, Any], *, timeout: float | None = None) -> Any:
        request = urllib.request.Request(
            self.endpoint + path,
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json", **self._auth},
            method="POST",
        )
        return self._send(request, timeout=timeout)

    def _send(self, request: urllib.request.Request, *, timeout: float | None = None) -> Any:
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            body = exc.read()
            message = error_message(body) or body.decode(errors="replace").strip() or exc.reason
            raise GatewayError(exc.code, f"{request.full_url}: HTTP {exc.code}: {message}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise GatewayUnreachable(f"cannot reach the gateway at {self.endpoint}: {_reason(exc)}") from exc
        try:
            return json.loads(payload) if payload else None
        except ValueError as exc:
            raise GatewayError(200, f"{request.full_url}: the answer is not JSON") from exc
