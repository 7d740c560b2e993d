"""A FakeNeuron as a process of its own, for tests that kill, stop or restart a neuron.

    python tests/support/fake_neuron_process.py --port P [--devices-mb 24000] \\
        [--size MODEL=MB ...] [--preload MODEL[=STATUS] ...]

It serves the neuron management API of `FakeNeuron` and, on the same port, the inference
route `/v1/chat/completions` (a canned completion), so the gateway's inference URL for
every model is this process. `GET /calls` tells a test what reached it: load and unload
calls and the chat requests received.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypercorn.asyncio import serve
from hypercorn.config import Config
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
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

    async def chat(request: Request) -> Response:
        chats.append(await request.body())
        return Response(CHAT_JSON, media_type="application/json")

    async def calls(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "loads": [c["model_id"] for c in neuron.load_calls],
                "unloads": neuron.unload_calls,
                "chats": len(chats),
            }
        )

    neuron.app.router.routes.extend(
        [Route("/v1/chat/completions", chat, methods=["POST"]), Route("/calls", calls)]
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
