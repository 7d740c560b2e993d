"""One request driven over raw ASGI, for tests that act on response frames as they arrive
(keep-alives, a client that hangs up mid-stream), which an HTTP client hides."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp


async def drive(
    app: ASGIApp,
    body: dict[str, Any],
    on_body: Callable[[bytes], Any],
    *,
    path: str = "/v1/chat/completions",
    spec_version: str = "2.3",
    disconnected: asyncio.Event | None = None,
    guard_secs: float = 60.0,
) -> None:
    """Run one request; the client hangs up when `on_body(chunk)` returns "disconnect" or when
    `disconnected` is set. `spec_version` 2.4 and later: a send after the hang-up fails, as a
    server of that version reports a gone client. A request still running after `guard_secs`
    fails the test instead of hanging it."""
    disconnected = disconnected or asyncio.Event()
    sent_body = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if disconnected.is_set() and spec_version >= "2.4":
            raise OSError("connection reset by peer")
        if message["type"] == "http.response.body" and on_body(message.get("body", b"")) == "disconnect":
            disconnected.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "server": ("test", 80),
        "client": ("test", 1234),
        "root_path": "",
    }
    await asyncio.wait_for(app(scope, receive, send), guard_secs)
