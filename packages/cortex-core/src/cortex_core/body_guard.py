"""BodyGuard: read every request body once, under limits, before any handler sees it.

An ASGI middleware shared by the gateway and the neuron. Handlers used to read bodies
themselves, without a deadline and with no total: a chunked upload that never finished
was held forever with its buffer, and ten of them held 244 MB. Here a body is read

- within `read_timeout_secs` (then 408),
- up to `max_body_bytes` (413, before reading when Content-Length already says so),
- while the bytes buffered by all requests being read stay under the shared
  `BufferBudget` (503 + Retry-After: the node is busy, not the request wrong),

into a memory map of its own that is unmapped the moment the request is refused (see
`_Upload`: its memory goes back to the system, not to a heap that may keep it). The complete body is then checked — JSON nesting, and whatever the
app adds (prompt limits) — on a worker thread when it is large, so a hostile body never
stalls the event loop, and replayed to the app as a single message.

Refusals are rendered by the app's `render` (its dialect); a client that goes away while
sending gets no answer.

Plain ASGI (cortex-core imports no web framework), like `request_id.RequestIdMiddleware`.
"""

from __future__ import annotations

import asyncio
import mmap
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from cortex_core.errors import ApiError
from cortex_core.limits import MAX_JSON_DEPTH, json_depth_exceeds, too_deep

# Bodies larger than this are checked on a worker thread (a thread hop costs ~50 µs, more
# than checking a small body inline).
OFFLOAD_BYTES = 256 * 1024
BUSY_RETRY_AFTER_SECS = 1.0
# A body in parts without a Content-Length starts in a buffer this large (it doubles).
INITIAL_BUFFER_BYTES = 1024 * 1024
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

# Plain ASGI, no framework import: cortex-core is installed on workstations without one.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
# The app's error rendering, in its dialect: an ASGI app answering with the error.
Render = Callable[[Scope, ApiError], ASGIApp]
BodyCheck = Callable[[bytes], None]


@dataclass(frozen=True, slots=True)
class BodyLimits:
    max_body_bytes: int
    read_timeout_secs: float
    # How messages name the settings: "{key}" → e.g. "gateway.{key}" or "{key} in neuron.toml".
    setting: str = "{key}"
    max_json_depth: int = MAX_JSON_DEPTH

    def named(self, key: str) -> str:
        return self.setting.format(key=key)


class BufferBudget:
    """Bytes held by the bodies being read right now, across every request of one app."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0

    def take(self, size: int) -> bool:
        if self.used + size > self.capacity:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size


class _ClientGone(Exception):
    pass


class _Upload:
    """A body arriving in parts, gathered in an anonymous memory map.

    Not a bytearray: glibc serves and frees large blocks with mmap only until one has been
    freed, after which it raises its threshold and takes them from the heap, where freed
    memory often stays with the process. A map of our own is unmapped on `close`, so a
    refused or stalled upload gives its memory back to the system at once; its pages are
    only materialised as bytes arrive, so sizing it by Content-Length costs nothing.
    """

    def __init__(self, capacity: int, limit: int) -> None:
        self._limit = limit
        self._map = mmap.mmap(-1, max(1, min(capacity, limit)))
        self.size = 0

    def append(self, chunk: bytes) -> None:
        end = self.size + len(chunk)
        if end > len(self._map):
            grown = mmap.mmap(-1, min(max(end, 2 * len(self._map)), self._limit))
            grown[: self.size] = self._map[: self.size]
            self._map.close()
            self._map = grown
        self._map[self.size : end] = chunk
        self.size = end

    def content(self) -> bytes:
        return self._map[: self.size]

    def close(self) -> None:
        self._map.close()


class BodyGuard:
    def __init__(
        self,
        app: ASGIApp,
        *,
        limits: BodyLimits,
        budget: BufferBudget,
        render: Render,
        check: BodyCheck | None = None,
    ) -> None:
        self._app = app
        self._limits = limits
        self._budget = budget
        self._render = render
        self._check = check

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in _NO_BODY_METHODS:
            await self._app(scope, receive, send)
            return
        try:
            body = await self._read(scope, receive)
            if len(body) > OFFLOAD_BYTES:
                await asyncio.to_thread(self._inspect, body)
            else:
                self._inspect(body)
        except _ClientGone:
            return
        except ApiError as error:
            await self._render(scope, error)(scope, receive, send)
            return
        await self._app(scope, _replay(body, receive), send)

    def _too_large(self) -> ApiError:
        limit = self._limits.max_body_bytes
        return ApiError(
            413,
            f"request body exceeds the limit of {limit} bytes ({self._limits.named('max_body_bytes')})",
            code="request_too_large",
        )

    async def _read(self, scope: Scope, receive: Receive) -> bytes:
        limits = self._limits
        declared: int | None = None
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit():
                declared = int(value)
        if declared is not None and declared > limits.max_body_bytes:
            raise self._too_large()
        upload: _Upload | None = None
        try:
            async with asyncio.timeout(limits.read_timeout_secs):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _ClientGone()
                    chunk = message.get("body", b"")
                    more = message.get("more_body", False)
                    if upload is None and not more:
                        # The usual case: the whole body in one message, nothing to gather.
                        if len(chunk) > limits.max_body_bytes:
                            raise self._too_large()
                        return bytes(chunk)
                    if upload is None:
                        upload = _Upload(declared or INITIAL_BUFFER_BYTES, limits.max_body_bytes)
                    if upload.size + len(chunk) > limits.max_body_bytes:
                        raise self._too_large()
                    if not self._budget.take(len(chunk)):
                        raise ApiError(
                            503,
                            f"this server is already holding {self._budget.used} bytes of request bodies "
                            f"being uploaded ({limits.named('max_buffered_bytes')}); retry shortly",
                            code="server_busy",
                            retry_after=BUSY_RETRY_AFTER_SECS,
                        )
                    upload.append(chunk)
                    if not more:
                        return upload.content()
        except TimeoutError:
            raise ApiError(
                408,
                f"the request body did not arrive within {limits.read_timeout_secs:g} s "
                f"({limits.named('body_read_timeout_secs')})",
                code="request_timeout",
            ) from None
        finally:
            if upload is not None:
                self._budget.give(upload.size)
                upload.close()

    def _inspect(self, body: bytes) -> None:
        if json_depth_exceeds(body, self._limits.max_json_depth):
            raise too_deep(self._limits.max_json_depth)
        if self._check is not None:
            self._check(body)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body as one message, then the client's own messages (a disconnect, later)."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replayed
