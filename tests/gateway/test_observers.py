"""The SSE/body observer: timings from the first content token, usage from the final chunk(s)."""

from __future__ import annotations

import pytest

from cortex_gateway.observers import BodyObserver, StreamObserver, Usage, observer_for

ROLE = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
KEEPALIVE = b": keep-alive\n\n"
HELLO = b'data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n'
LO = b'data: {"choices":[{"index":0,"delta":{"content":"lo"}}]}\n\n'
THINK = b'data: {"choices":[{"index":0,"delta":{"reasoning_content":"hmm"}}]}\n\n'
REASONING = b'data: {"choices":[{"index":0,"delta":{"reasoning":"hmm"}}]}\n\n'
TOOL = b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c1","function":{"name":"f","arguments":""}}]}}]}\n\n'
FINISH = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
USAGE = (
    b'data: {"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":7,'
    b'"total_tokens":19,"prompt_tokens_details":{"cached_tokens":4},"completion_tokens_details":{"reasoning_tokens":2}}}\n\n'
)
DONE = b"data: [DONE]\n\n"
TEXT = b'data: {"choices":[{"index":0,"text":"Hi"}]}\n\n'
EMPTY_TEXT = b'data: {"choices":[{"index":0,"text":""}]}\n\n'
RESP_CREATED = (
    b'event: response.created\ndata: {"type":"response.created","response":{"id":"r","usage":null}}\n\n'
)
RESP_DELTA = (
    b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"Hi"}\n\n'
)
RESP_DONE_TEXT = b'event: response.output_text.done\ndata: {"type":"response.output_text.done","text":"a \\"usage\\" word"}\n\n'
RESP_COMPLETED = (
    b'event: response.completed\ndata: {"type":"response.completed","response":{"id":"r","usage":'
    b'{"input_tokens":5,"output_tokens":3,"input_tokens_details":{"cached_tokens":1}}}}\n\n'
)


def feed_all(events: list[tuple[float, bytes]]) -> StreamObserver:
    observer = StreamObserver()
    for now, chunk in events:
        observer.feed(chunk, now)
    return observer


@pytest.mark.parametrize(
    ("name", "events", "first", "last", "usage"),
    [
        (
            "role chunk and keep-alive do not count as the first token",
            [
                (1.0, ROLE),
                (2.0, KEEPALIVE),
                (3.0, HELLO),
                (4.0, LO),
                (5.0, FINISH),
                (6.0, USAGE),
                (6.5, DONE),
            ],
            3.0,
            5.0,
            Usage(12, 7, 4),
        ),
        ("reasoning_content is a token", [(1.0, ROLE), (2.0, THINK), (3.0, HELLO)], 2.0, 3.0, None),
        ("reasoning is a token", [(1.0, ROLE), (2.0, REASONING)], 2.0, 2.0, None),
        ("a tool-call delta is a token", [(1.0, ROLE), (2.5, TOOL), (3.0, FINISH)], 2.5, 3.0, None),
        ("text completions stream `text`", [(1.0, EMPTY_TEXT), (2.0, TEXT)], 2.0, 2.0, None),
        (
            "Responses API: delta events and usage in response.completed",
            [
                (1.0, RESP_CREATED),
                (2.0, RESP_DELTA),
                (3.0, RESP_DELTA),
                (3.5, RESP_DONE_TEXT),
                (4.0, RESP_COMPLETED),
            ],
            2.0,
            3.5,
            Usage(5, 3, 1),
        ),
        (
            "no content at all",
            [(1.0, ROLE), (2.0, FINISH), (3.0, USAGE), (4.0, DONE)],
            None,
            None,
            Usage(12, 7, 4),
        ),
        (
            "events split across chunks at any byte",
            [
                (1.0, ROLE + HELLO[:10]),
                (2.0, HELLO[10:30]),
                (3.0, HELLO[30:] + LO[:5]),
                (4.0, LO[5:] + USAGE[:40]),
                (5.0, USAGE[40:]),
            ],
            3.0,
            4.0,
            Usage(12, 7, 4),
        ),
        (
            "many events packed in one chunk",
            [(1.0, ROLE + HELLO + LO + FINISH + USAGE + DONE)],
            1.0,
            1.0,
            Usage(12, 7, 4),
        ),
        (
            "CRLF line endings",
            [
                (1.0, ROLE.replace(b"\n", b"\r\n")),
                (2.0, HELLO.replace(b"\n", b"\r\n")),
                (3.0, USAGE.replace(b"\n", b"\r\n")),
            ],
            2.0,
            2.0,
            Usage(12, 7, 4),
        ),
        ("non-JSON data is ignored", [(1.0, b"data: not json\n\n"), (2.0, HELLO)], 2.0, 2.0, None),
        (
            "last event without a trailing blank line",
            [(1.0, HELLO), (2.0, USAGE.rstrip(b"\n"))],
            1.0,
            1.0,
            Usage(12, 7, 4),
        ),
        (
            "usage reported in every chunk: the last wins",
            [
                (
                    1.0,
                    b'data: {"choices":[{"delta":{"content":"a"}}],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n',
                ),
                (
                    2.0,
                    b'data: {"choices":[{"delta":{"content":"b"}}],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n',
                ),
            ],
            1.0,
            2.0,
            Usage(3, 2, None),
        ),
    ],
)
def test_stream_observer(
    name: str, events: list[tuple[float, bytes]], first: float | None, last: float | None, usage: Usage | None
) -> None:
    observation = feed_all(events).finish()
    assert observation.streamed
    assert observation.first_byte_at == events[0][0], name
    assert observation.first_token_at == first, name
    assert observation.last_token_at == last, name
    assert observation.usage == usage, name


@pytest.mark.parametrize(
    ("chunks", "usage"),
    [
        (
            [b'{"id":"x","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}'],
            Usage(9, 2, None),
        ),
        (
            [
                b'{"id":"x","usage":{"prompt_tokens":9,',
                b'"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":8}}}',
            ],
            Usage(9, 2, 8),
        ),
        ([b'{"object":"response","usage":{"input_tokens":4,"output_tokens":6}}'], Usage(4, 6, None)),
        ([b'{"id":"x"}'], None),
        ([b"<html>bad gateway</html>"], None),
        ([], None),
    ],
)
def test_body_observer(chunks: list[bytes], usage: Usage | None) -> None:
    observer = BodyObserver()
    for i, chunk in enumerate(chunks):
        observer.feed(chunk, float(i + 1))
    observation = observer.finish()
    assert not observation.streamed
    assert observation.first_token_at is None
    assert observation.usage == usage
    assert observation.first_byte_at == (1.0 if chunks else None)


def test_observer_for_picks_by_content_type() -> None:
    assert isinstance(observer_for("text/event-stream; charset=utf-8"), StreamObserver)
    assert isinstance(observer_for("application/json"), BodyObserver)
    assert isinstance(observer_for(None), BodyObserver)


def test_an_event_that_never_ends_is_dropped_not_buffered_forever() -> None:
    observer = StreamObserver()
    observer.feed(b"data: " + b"x" * (2 * 1024 * 1024), 1.0)
    observer.feed(b"\n\n" + HELLO + USAGE, 2.0)
    observation = observer.finish()
    assert (observation.first_token_at, observation.usage) == (2.0, Usage(12, 7, 4))
