"""BodyGuard at the ASGI level: every refusal, the budget's accounting, the replay."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from cortex_core.body_guard import OFFLOAD_BYTES, BodyGuard, BodyLimits, BufferBudget
from cortex_core.errors import ApiError
from cortex_core.limits import PromptLimits, prompt_check

Message = dict[str, Any]


def render(scope: Any, error: ApiError) -> Callable[[Any, Any, Any], Awaitable[None]]:
    async def respond(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": error.status, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps(error.openai_body()).encode()})

    return respond


class Echo:
    """The app behind the guard: answers with the body it read, and what came after it."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls += 1
        first = await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": first["body"]})


def guard(
    app: Any, budget: BufferBudget | None = None, *, max_bytes: int = 1000, timeout: float = 5.0, **kw: Any
) -> BodyGuard:
    return BodyGuard(
        app,
        limits=BodyLimits(max_body_bytes=max_bytes, read_timeout_secs=timeout, setting="gateway.{key}"),
        budget=budget or BufferBudget(10_000),
        render=render,
        **kw,
    )


def scope(method: str = "POST", headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {"type": "http", "method": method, "path": "/v1/chat/completions", "headers": headers or []}


async def call(app: Any, messages: list[Message], request: dict[str, Any] | None = None) -> tuple[int, bytes]:
    """Run `app` with `messages` as the client's, then (if it keeps reading) a stall."""
    queue = list(messages)
    sent: list[Message] = []

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        await asyncio.Event().wait()  # a client that sends nothing more
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    await app(request or scope(), receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def chunk(body: bytes, more: bool = False) -> Message:
    return {"type": "http.request", "body": body, "more_body": more}


async def test_a_body_in_chunks_reaches_the_app_whole() -> None:
    app = Echo()
    assert await call(guard(app), [chunk(b'{"a":', True), chunk(b" 1}")]) == (200, b'{"a": 1}')


async def test_a_declared_length_over_the_limit_is_413_before_reading() -> None:
    app = Echo()
    status, body = await call(guard(app), [], scope(headers=[(b"content-length", b"1001")]))
    assert status == 413 and app.calls == 0
    assert b"gateway.max_body_bytes" in body


async def test_a_chunked_body_growing_over_the_limit_is_413() -> None:
    budget = BufferBudget(10_000)
    status, _ = await call(guard(Echo(), budget), [chunk(b"x" * 600, True), chunk(b"x" * 600, True)])
    assert status == 413 and budget.used == 0


async def test_a_stalled_upload_is_408_and_gives_its_bytes_back() -> None:
    budget = BufferBudget(10_000)
    status, body = await call(guard(Echo(), budget, timeout=0.05), [chunk(b"x" * 500, True)])
    assert status == 408 and b"gateway.body_read_timeout_secs" in body
    assert budget.used == 0


async def test_past_the_total_budget_a_request_is_503_with_retry_after() -> None:
    budget = BufferBudget(1000)
    assert budget.take(800)  # another upload holds most of it
    status, body = await call(guard(Echo(), budget), [chunk(b"x" * 300, True)])
    assert status == 503 and b"gateway.max_buffered_bytes" in body
    assert budget.used == 800


async def test_uploads_in_progress_share_the_budget() -> None:
    budget = BufferBudget(1000)
    stalled = [asyncio.create_task(call(guard(Echo(), budget), [chunk(b"x" * 400, True)])) for _ in range(2)]
    for _ in range(3):  # each task runs to its stall: one chunk in, then waiting for more
        await asyncio.sleep(0)
    assert budget.used == 800
    status, _ = await call(guard(Echo(), budget), [chunk(b"x" * 300, True)])
    assert status == 503
    for task in stalled:
        task.cancel()
    await asyncio.gather(*stalled, return_exceptions=True)
    assert budget.used == 0


async def test_deep_json_is_a_400_before_the_app_sees_it() -> None:
    app = Echo()
    status, body = await call(guard(app), [chunk(b"[" * 200 + b"]" * 200)])
    assert status == 400 and app.calls == 0
    assert json.loads(body)["error"]["code"] == "json_too_deep"


@pytest.mark.parametrize("size", [100, OFFLOAD_BYTES + 1])
async def test_the_app_check_refuses_small_and_large_bodies(size: int) -> None:
    check = prompt_check(lambda model: PromptLimits(max_messages=1, max_prompt_bytes=10**9))
    messages = [{"role": "user", "content": "x" * (size // 2)}] * 2
    body = json.dumps({"model": "m", "messages": messages}).encode()
    budget = BufferBudget(10**7)
    status, answer = await call(guard(Echo(), budget, max_bytes=10**7, check=check), [chunk(body)])
    assert status == 400 and json.loads(answer)["error"]["code"] == "too_many_messages"


async def test_a_client_gone_while_sending_gets_no_answer() -> None:
    app = Echo()
    sent: list[Message] = []
    queue: list[Message] = [chunk(b"x", True), {"type": "http.disconnect"}]

    async def receive() -> Message:
        return queue.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    await guard(app)(scope(), receive, send)
    assert sent == [] and app.calls == 0


async def test_get_requests_pass_without_reading() -> None:
    app = Echo()
    status, body = await call(guard(app), [chunk(b"")], scope("GET"))
    assert (status, body, app.calls) == (200, b"", 1)
