"""Cost of the stream converters per upstream chunk, against a bare JSON decode in the same run.

    .venv/bin/python bench/dialects.py

Prints µs per chunk for: decoding the chunk as a plain dict (the floor any relay that reads
chunks pays), and decode → convert → encode for the Anthropic and Responses converters.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec

from cortex_core.anthropic.stream import AnthropicStreamConverter
from cortex_core.openai.chat import ChatCompletionChunk
from cortex_core.openai.responses import ResponsesRequest
from cortex_core.openai.responses_stream import ResponsesStreamConverter
from cortex_core.sse import encode_event

CHUNKS = 2000
RAW = [
    b'{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":'
    b'[{"index":0,"delta":{"content":"tok%d"},"finish_reason":null}]}' % i
    for i in range(CHUNKS)
]


def plain_decode() -> None:
    for raw in RAW:
        msgspec.json.decode(raw)


def anthropic_stream() -> None:
    converter = AnthropicStreamConverter()
    for raw in RAW:
        for event in converter.feed(msgspec.json.decode(raw, type=ChatCompletionChunk)):
            encode_event(event)
    for event in converter.finish():
        encode_event(event)


def responses_stream() -> None:
    converter = ResponsesStreamConverter(
        ResponsesRequest(model="m", input="x"), response_id="resp_1", created_at=0
    )
    for raw in RAW:
        for event in converter.feed(msgspec.json.decode(raw, type=ChatCompletionChunk)):
            encode_event(event)
    for event in converter.finish():
        encode_event(event)


def best_of(run: Callable[[], None], repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times) / CHUNKS * 1e6


def main() -> None:
    floor = best_of(plain_decode)
    print(f"plain JSON decode      {floor:6.2f} µs/chunk (baseline)")
    for name, run in (("anthropic converter", anthropic_stream), ("responses converter", responses_stream)):
        cost = best_of(run)
        print(f"{name:22} {cost:6.2f} µs/chunk ({cost / floor:.1f}x baseline)")


if __name__ == "__main__":
    main()
