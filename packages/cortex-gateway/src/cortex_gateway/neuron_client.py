"""Client for the neuron's management API, decoding into cortex_core.neuron_api Structs.

The HTTP itself goes through a small `HttpTransport` seam: aiohttp in production, an
in-process ASGI transport in tests (tests/support/fake_neuron.py), so everything above the
socket (status handling, error messages, decoding, the loopback rewrite) is tested without
one. Every failure is a `NeuronError` whose message says what the neuron said.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
import msgspec

from cortex_core.neuron_api import (
    DiscoveryResponse,
    EndpointResponse,
    HealthResponse,
    LoadResponse,
    ModelInfo,
    ModelSpec,
    UnloadRequest,
    UnloadResponse,
)

T = TypeVar("T")

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "0.0.0.0", "::1"})


class NeuronError(Exception):
    """A neuron call failed: `status` is None when the neuron could not be reached."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class HttpTransport(Protocol):
    async def request(self, method: str, url: str, body: bytes | None) -> tuple[int, bytes]: ...

    async def close(self) -> None: ...


class AiohttpTransport:
    """One pooled aiohttp session, created on first use (it must live on the running loop)."""

    def __init__(self, token: str | None = None) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._headers = neuron_auth_headers(token)

    async def request(self, method: str, url: str, body: bytes | None) -> tuple[int, bytes]:
        if self._session is None:
            # Deadlines are the caller's (asyncio.timeout); none here.
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None), headers=self._headers
            )
        headers = {"content-type": "application/json"} if body is not None else None
        async with self._session.request(method, url, data=body, headers=headers) as response:
            return response.status, await response.read()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def neuron_auth_headers(token: str | None) -> dict[str, str]:
    """The header every call to a neuron carries when the fleet shares a token (auth.neuron_token_env)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def error_text(body: bytes) -> str:
    """The neuron's reason from an error body: `{"error": "..."}`, an OpenAI envelope, or raw text."""
    try:
        data: Any = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body.decode("utf-8", "replace").strip()[:2000] or "(empty body)"
    if isinstance(data, dict) and "error" in data:
        error = data["error"]
        if isinstance(error, str):
            return error
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        return msgspec.json.encode(error).decode()
    return msgspec.json.encode(data).decode()[:2000]


def rewrite_loopback(url: str, neuron_endpoint: str) -> str:
    """A neuron says `http://localhost:13131`; from here that means the neuron's own host."""
    parts = urlsplit(url)
    if parts.hostname in LOOPBACK_HOSTS:
        host = urlsplit(neuron_endpoint).hostname
        if host:
            netloc = f"[{host}]" if ":" in host else host
            if parts.port is not None:
                netloc = f"{netloc}:{parts.port}"
            parts = parts._replace(netloc=netloc)
    return urlunsplit(parts).rstrip("/")


def decode_models(body: bytes) -> list[ModelInfo]:
    """`GET /models`; an entry whose status this gateway does not know is kept as not routable."""
    try:
        return msgspec.json.decode(body, type=list[ModelInfo])
    except msgspec.ValidationError:
        pass
    models = []
    for raw in msgspec.json.decode(body, type=list[msgspec.Raw]):
        try:
            models.append(msgspec.json.decode(raw, type=ModelInfo))
        except msgspec.ValidationError as exc:
            fields = msgspec.json.decode(raw, type=dict[str, Any])
            if not isinstance(fields.get("id"), str):
                raise
            models.append(
                ModelInfo(
                    id=fields["id"],
                    harness=str(fields.get("harness", "")),
                    status="failed",
                    error=f"the neuron reported a state this gateway cannot route to ({exc})",
                )
            )
    return models


class NeuronClient:
    def __init__(
        self,
        transport: HttpTransport | None = None,
        *,
        poll_timeout: float = 5.0,
        load_timeout: float = 1800.0,
        unload_timeout: float = 120.0,
        token: str | None = None,
    ) -> None:
        self._transport = transport or AiohttpTransport(token)
        self.poll_timeout = poll_timeout
        self.load_timeout = load_timeout
        self.unload_timeout = unload_timeout

    async def close(self) -> None:
        await self._transport.close()

    async def _call(
        self, method: str, url: str, body: bytes | None, deadline_secs: float | None
    ) -> tuple[int, bytes]:
        try:
            async with asyncio.timeout(deadline_secs):
                return await self._transport.request(method, url, body)
        except TimeoutError as exc:
            raise NeuronError(f"{method} {url} timed out after {deadline_secs:g} s") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise NeuronError(f"{method} {url} failed: {exc or type(exc).__name__}") from exc

    async def _json(
        self, method: str, url: str, into: type[T], *, body: bytes | None = None, deadline_secs: float | None
    ) -> T:
        status, payload = await self._call(method, url, body, deadline_secs)
        if not 200 <= status < 300:
            raise NeuronError(f"HTTP {status}: {error_text(payload)}", status=status)
        try:
            return msgspec.json.decode(payload, type=into)
        except msgspec.DecodeError as exc:
            raise NeuronError(f"{method} {url}: unexpected response ({exc})", status=status) from exc

    async def discovery(self, endpoint: str) -> DiscoveryResponse:
        return await self._json(
            "GET", f"{endpoint}/discovery", DiscoveryResponse, deadline_secs=self.poll_timeout
        )

    async def health(self, endpoint: str) -> HealthResponse:
        return await self._json("GET", f"{endpoint}/health", HealthResponse, deadline_secs=self.poll_timeout)

    async def models(self, endpoint: str) -> list[ModelInfo]:
        status, payload = await self._call("GET", f"{endpoint}/models", None, self.poll_timeout)
        if not 200 <= status < 300:
            raise NeuronError(f"HTTP {status}: {error_text(payload)}", status=status)
        try:
            return decode_models(payload)
        except msgspec.DecodeError as exc:
            raise NeuronError(f"GET {endpoint}/models: unexpected response ({exc})", status=status) from exc

    async def load(self, endpoint: str, spec: ModelSpec) -> LoadResponse:
        """Synchronous on the neuron: returns once the model is resident."""
        body = msgspec.json.encode(spec)
        status, payload = await self._call("POST", f"{endpoint}/models/load", body, self.load_timeout)
        if 200 <= status < 300:
            try:
                return msgspec.json.decode(payload, type=LoadResponse)
            except msgspec.DecodeError:
                return LoadResponse(model_id=spec.model_id)
        reason = error_text(payload)
        # A concurrent load (a pre-warm or another gateway) finished first: that is success.
        if "already loaded" in reason:
            return LoadResponse(model_id=spec.model_id)
        raise NeuronError(reason, status=status)

    async def unload(self, endpoint: str, model_id: str) -> UnloadResponse:
        body = msgspec.json.encode(UnloadRequest(model_id=model_id))
        return await self._json(
            "POST", f"{endpoint}/models/unload", UnloadResponse, body=body, deadline_secs=self.unload_timeout
        )

    async def inference_url(self, endpoint: str, model_id: str) -> str:
        """Where to send inference for `model_id`: `{url}/v1/chat/completions` etc."""
        url = f"{endpoint}/models/{quote(model_id, safe='')}/endpoint"
        answer = await self._json("GET", url, EndpointResponse, deadline_secs=self.poll_timeout)
        return rewrite_loopback(answer.url, endpoint)
