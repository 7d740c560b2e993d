"""A scriptable fake neuron on loopback (aiohttp.web), and a minimal relay app around `Proxy`.

`FakeUpstream` answers the three OpenAI inference paths with whatever `Script` it holds:
a status, a content type, chunks with delays, an abrupt end after N chunks, or a wait
before the headers. It records every request (path, headers, body) and notices when the
gateway went away (its handler is cancelled, or a write fails).

`relay_app` is the smallest app that exercises the proxy the way the real app does:
parse `model`, acquire a lease, `proxy.forward`, render ApiError once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import httpx2
from aiohttp import web
from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cortex_core.config.gateway import ProxySection
from cortex_core.errors import ApiError
from cortex_core.http import SERVER_KEEP_ALIVE_SECS
from cortex_gateway.lease import LeaseProvider
from cortex_gateway.metrics import GatewayMetrics
from cortex_gateway.proxy import Proxy
from support.fixed_router import read_model
from support.loopback import LoopbackServer

CHAT_JSON = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "qwen",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hello there"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
    },
    separators=(",", ": "),  # deliberately not msgspec's compact form: bytes must pass unchanged
).encode()


def chat_chunk(delta: dict[str, object], *, finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return (
        b"data: "
        + json.dumps({"id": "c", "object": "chat.completion.chunk", "choices": [choice]}).encode()
        + b"\n\n"
    )


def sse_stream(tokens: Sequence[str], *, prompt_tokens: int = 5) -> list[bytes]:
    """A chat stream as a neuron sends it: role chunk, one chunk per token, finish, usage, [DONE]."""
    chunks = [chat_chunk({"role": "assistant", "content": ""})]
    chunks += [chat_chunk({"content": token}) for token in tokens]
    chunks.append(chat_chunk({}, finish="stop"))
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(tokens),
        "total_tokens": prompt_tokens + len(tokens),
    }
    chunks.append(b"data: " + json.dumps({"id": "c", "choices": [], "usage": usage}).encode() + b"\n\n")
    chunks.append(b"data: [DONE]\n\n")
    return chunks


@dataclass
class Script:
    status: int = 200
    content_type: str = "application/json"
    chunks: list[bytes] = field(default_factory=lambda: [CHAT_JSON])
    # Seconds before each chunk (the first one included).
    delay: float = 0.0
    # Seconds before the status line and headers go out.
    before_headers: float = 0.0
    # Abort the connection after this many chunks (None: finish normally).
    die_after: int | None = None
    # Seconds to sit silent after this many chunks: (index, seconds).
    stall: tuple[int, float] | None = None
    extra_headers: dict[str, str] = field(default_factory=dict)
    # Hold chunk `index` until the event is set: (index, event). Proves relaying is incremental.
    gate: tuple[int, asyncio.Event] | None = None


@dataclass
class RecordedCall:
    path: str
    headers: dict[str, str]
    body: bytes


class FakeUpstream(LoopbackServer):
    def __init__(self, script: Script | None = None) -> None:
        self.script = script or Script()
        self.calls: list[RecordedCall] = []
        self.called = asyncio.Event()  # a request has arrived
        self.gone = asyncio.Event()  # the gateway closed the connection while we were answering
        self.finished = 0

    def routes(self, app: web.Application) -> None:
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
            app.router.add_post(path, self._handle)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        script = self.script
        self.calls.append(RecordedCall(request.path, dict(request.headers), await request.read()))
        self.called.set()
        try:
            if script.before_headers:
                await asyncio.sleep(script.before_headers)
            response = web.StreamResponse(status=script.status, headers=script.extra_headers)
            response.content_type = script.content_type
            if script.content_type == "application/json" and script.die_after is None and not script.delay:
                response.content_length = sum(len(c) for c in script.chunks)
            await response.prepare(request)
            for index, chunk in enumerate(script.chunks):
                if script.die_after is not None and index == script.die_after:
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                if script.gate is not None and index == script.gate[0]:
                    await script.gate[1].wait()
                if script.stall is not None and index == script.stall[0]:
                    await asyncio.sleep(script.stall[1])
                if script.delay:
                    await asyncio.sleep(script.delay)
                await response.write(chunk)
            await response.write_eof()
            self.finished += 1
            return response
        except (asyncio.CancelledError, ConnectionResetError):
            self.gone.set()
            raise


def relay_app(router: LeaseProvider, config: ProxySection | None = None) -> Starlette:
    """Routes the three OpenAI inference paths through a `Proxy`; `app.state.metrics` for checks."""
    metrics = GatewayMetrics()
    proxy = Proxy(config or ProxySection(), metrics)

    async def handle(request: Request) -> Response:
        body = await request.body()
        try:
            lease = await router.acquire(read_model(body))
        except ApiError as error:
            return JSONResponse(error.openai_body(), status_code=error.status, headers=error.headers())
        # scope["path"], as the gateway's relay does: request.url costs a parse per request,
        # which the benchmark (bench/gateway.py) would count.
        return await proxy.forward(request, body, lease, request.scope["path"])

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await proxy.start()
        yield
        await proxy.close()

    app = Starlette(
        routes=[
            Route(p, handle, methods=["POST"])
            for p in ("/v1/chat/completions", "/v1/completions", "/v1/responses")
        ],
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    app.state.proxy = proxy
    return app


@contextlib.asynccontextmanager
async def in_process(app: Starlette) -> AsyncIterator[httpx2.AsyncClient]:
    """An httpx2 client on the app in process, with the proxy's session opened (no lifespan there)."""
    proxy: Proxy = app.state.proxy
    await proxy.start()
    try:
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client
    finally:
        await proxy.close()


@contextlib.asynccontextmanager
async def on_hypercorn(app: Starlette) -> AsyncIterator[str]:
    """Serve `app` with hypercorn on a free loopback port; yields its base URL."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    config = HypercornConfig()
    # hypercorn takes the descriptor over (and closes it at shutdown).
    config.bind = [f"fd://{listener.detach()}"]
    config.accesslog = None
    config.errorlog = None
    # As the daemons serve (cortex_core.http): the gateway's pool never outlives it.
    config.keep_alive_timeout = SERVER_KEEP_ALIVE_SECS
    stop = asyncio.Event()
    server = asyncio.ensure_future(serve(app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop.set()
        await server
