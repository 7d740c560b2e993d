"""A scripted neuron inference server on loopback (aiohttp.web) for dialect tests.

`ScriptedNeuron` answers `/v1/chat/completions` from a `Reply`: a list of OpenAI chat
chunks. A streamed request gets them as SSE (plus the usage chunk when the request asked
for `stream_options.include_usage`, then `[DONE]`); a non-streamed one gets the same answer
folded into one `chat.completion` (`fold_chunks`), so a test can check that both paths of
the gateway agree. A reply can also be an HTTP error, an OpenAI error frame mid-stream, or
a connection that breaks mid-stream.

`/v1/chat/count_tokens` answers `{"input_tokens": count_tokens}`; `/v1/completions` and
`/v1/responses` answer the canned bodies in `raw[(path, stream)]`. Every request is
recorded (path, headers, JSON body).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from support.loopback import LoopbackServer

Chunk = dict[str, Any]

CHUNK_ID = "chatcmpl-scripted"


def chunk(delta: dict[str, Any], *, finish: str | None = None, **choice: Any) -> Chunk:
    """One chat.completion.chunk with a single choice."""
    return {
        "id": CHUNK_ID,
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "scripted",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, **choice}],
    }


def role() -> Chunk:
    return chunk({"role": "assistant", "content": ""})


def text(piece: str) -> Chunk:
    return chunk({"content": piece})


def reasoning(piece: str, *, field_name: str = "reasoning_content") -> Chunk:
    return chunk({field_name: piece})


def tool_start(index: int, call_id: str, name: str, arguments: str = "") -> Chunk:
    call = {
        "index": index,
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }
    return chunk({"tool_calls": [call]})


def tool_arguments(index: int, arguments: str) -> Chunk:
    return chunk({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]})


def finish(reason: str, **choice: Any) -> Chunk:
    return chunk({}, finish=reason, **choice)


@dataclass
class Reply:
    chunks: list[Chunk] = field(default_factory=list)
    prompt_tokens: int = 11
    # Default: one output token per chunk that carries text, reasoning or tool calls.
    completion_tokens: int | None = None
    cached_tokens: int = 0
    # An HTTP error instead of an answer: status, OpenAI error body, Retry-After.
    status: int = 200
    error: dict[str, Any] | None = None
    retry_after: str | None = None
    # Streamed only: an OpenAI error frame after this many frames, or the connection aborted.
    error_frame_after: int | None = None
    break_after: int | None = None
    # Streamed only: seconds before each frame, and a silence of (before frame index, seconds).
    delay: float = 0.0
    stall: tuple[int, float] | None = None
    # Extra headers on a successful answer (e.g. the neuron's x-cortex-max-tokens-clamped).
    headers: dict[str, str] = field(default_factory=dict)

    def usage(self) -> dict[str, Any]:
        produced = sum(1 for c in self.chunks if _carries_output(c))
        completion = self.completion_tokens if self.completion_tokens is not None else produced
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


def _carries_output(c: Chunk) -> bool:
    delta = c["choices"][0]["delta"] if c["choices"] else {}
    return bool(
        delta.get("content")
        or delta.get("reasoning_content")
        or delta.get("reasoning")
        or delta.get("tool_calls")
    )


def fold_chunks(chunks: list[Chunk], usage: dict[str, Any], model: str = "scripted") -> dict[str, Any]:
    """The non-streamed chat.completion equal to a chunk sequence."""
    content: list[str] = []
    thinking: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    finish_reason: str | None = None
    extra: dict[str, Any] = {}
    for c in chunks:
        for choice in c["choices"]:
            delta = choice["delta"]
            content.append(delta.get("content") or "")
            thinking.append(delta.get("reasoning_content") or delta.get("reasoning") or "")
            for call in delta.get("tool_calls") or []:
                entry = calls.setdefault(
                    call["index"], {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
                )
                entry["id"] = call.get("id") or entry["id"]
                function = call.get("function") or {}
                entry["function"]["name"] = function.get("name") or entry["function"]["name"]
                entry["function"]["arguments"] += function.get("arguments") or ""
            if choice.get("finish_reason"):
                finish_reason = choice["finish_reason"]
                extra = {k: v for k, v in choice.items() if k not in ("index", "delta", "finish_reason")}
    message: dict[str, Any] = {"role": "assistant", "content": "".join(content) or None}
    if "".join(thinking):
        message["reasoning_content"] = "".join(thinking)
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return {
        "id": CHUNK_ID,
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, **extra}],
        "usage": usage,
    }


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class ScriptedNeuron(LoopbackServer):
    def __init__(self, reply: Reply | None = None) -> None:
        self.reply = reply or Reply()
        self.count_tokens = 42
        self.raw: dict[tuple[str, bool], tuple[str, bytes]] = {}
        self.calls: list[Recorded] = []
        self.gone = asyncio.Event()

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/chat/count_tokens", self._count)
        app.router.add_post("/v1/completions", self._raw)
        app.router.add_post("/v1/responses", self._raw)

    async def _record(self, request: web.Request) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(await request.read())
        self.calls.append(Recorded(request.path, dict(request.headers), body))
        return body

    async def _count(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response({"input_tokens": self.count_tokens})

    async def _raw(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        content_type, payload = self.raw[(request.path, bool(body.get("stream")))]
        return web.Response(body=payload, content_type=content_type)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        reply = self.reply
        if reply.status != 200:
            headers = {"retry-after": reply.retry_after} if reply.retry_after else {}
            return web.json_response(reply.error or {}, status=reply.status, headers=headers)
        # Like a neuron, it names the model the request named.
        model = body["model"]
        if not body.get("stream"):
            return web.json_response(fold_chunks(reply.chunks, reply.usage(), model), headers=reply.headers)
        frames = [b"data: " + json.dumps({**c, "model": model}).encode() + b"\n\n" for c in reply.chunks]
        if (body.get("stream_options") or {}).get("include_usage"):
            usage_chunk = {**chunk({}), "choices": [], "usage": reply.usage()}
            frames.append(b"data: " + json.dumps(usage_chunk).encode() + b"\n\n")
        frames.append(b"data: [DONE]\n\n")
        response = web.StreamResponse(headers={"content-type": "text/event-stream", **reply.headers})
        await response.prepare(request)
        try:
            for index, frame in enumerate(frames):
                if index == reply.error_frame_after:
                    error = {
                        "error": {"message": "device fault: CUDA error", "type": "api_error", "code": None}
                    }
                    await response.write(b"data: " + json.dumps(error).encode() + b"\n\n")
                    break
                if index == reply.break_after:
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                if reply.stall is not None and index == reply.stall[0]:
                    await asyncio.sleep(reply.stall[1])
                if reply.delay:
                    await asyncio.sleep(reply.delay)
                # Split each frame in two writes: the gateway must not depend on boundaries.
                half = len(frame) // 2
                await response.write(frame[:half])
                await response.write(frame[half:])
            await response.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            self.gone.set()
            raise
        return response
