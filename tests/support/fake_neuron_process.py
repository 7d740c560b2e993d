"""A FakeNeuron as a process of its own, for tests that kill, stop or restart a neuron.

    python tests/support/fake_neuron_process.py --port P [--devices-mb 24000] \\
        [--size MODEL=MB ...] [--preload MODEL[=STATUS] ...]

It serves the neuron management API of `FakeNeuron` and, on the same port, the inference
route `/v1/chat/completions` (a canned completion), so the gateway's inference URL for
every model is this process. `GET /calls` tells a test what reached it: load and unload
calls and the chat requests received.

A streamed chat (`"stream": true`) gets a role chunk and one text chunk at once; then,
when the last message says "hold", it waits for `POST /release`, when it says "forever",
it never goes on; then the finish chunk, usage (when asked for) and `[DONE]`. Tests of
what a gateway does with streams in flight use it: nothing depends on speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypercorn.asyncio import serve
from hypercorn.config import Config
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from support.fake_neuron import FakeNeuron
from support.fake_upstream import CHAT_JSON


def build(args: argparse.Namespace) -> FakeNeuron:
    sizes = dict(item.split("=", 1) for item in args.size)
    neuron = FakeNeuron(
        "proc",
        devices_mb=args.devices_mb,
        sizes_mb={model: int(mb) for model, mb in sizes.items()},
        inference_url=f"http://127.0.0.1:{args.port}",
    )
    for item in args.preload:
        model, _, status = item.partition("=")
        neuron.preload(model)
        if status:
            neuron.models[model].status = status
            neuron.models[model].error = f"{model} is {status} (set by the test)"
    chats: list[bytes] = []
    released = asyncio.Event()

    async def chat(request: Request) -> Response:
        body = await request.body()
        chats.append(body)
        parsed = json.loads(body)
        if not parsed.get("stream"):
            return Response(CHAT_JSON, media_type="application/json")
        usage = bool((parsed.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(
            stream(parsed["model"], parsed["messages"][-1]["content"], usage),
            media_type="text/event-stream",
        )

    async def stream(model: str, content: str, usage: bool) -> AsyncIterator[bytes]:
        def frame(delta: dict[str, object], finish: str | None = None) -> bytes:
            chunk = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return b"data: " + json.dumps(chunk).encode() + b"\n\n"

        yield frame({"role": "assistant", "content": ""})
        yield frame({"content": "Hello"})
        if content == "hold":
            await released.wait()
        elif content == "forever":
            await asyncio.Event().wait()
        yield frame({}, "stop")
        if usage:
            counts = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
            tail = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model}
            yield b"data: " + json.dumps({**tail, "choices": [], "usage": counts}).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    async def release(request: Request) -> Response:
        released.set()
        return Response(status_code=204)

    async def calls(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "loads": [c["model_id"] for c in neuron.load_calls],
                "unloads": neuron.unload_calls,
                "chats": len(chats),
            }
        )

    neuron.app.router.routes.extend(
        [
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/calls", calls),
            Route("/release", release, methods=["POST"]),
        ]
    )
    return neuron


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--devices-mb", type=int, nargs="*", default=[24_000])
    parser.add_argument("--size", action="append", default=[])
    parser.add_argument("--preload", action="append", default=[])
    args = parser.parse_args()
    neuron = build(args)
    config = Config()
    config.bind = [f"127.0.0.1:{args.port}"]
    config.accesslog = None
    asyncio.run(serve(neuron.app, config))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
