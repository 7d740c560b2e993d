"""SSE framing for both dialects and the incremental decoder."""

from __future__ import annotations

import pytest

from cortex_core.anthropic.messages import MessageStopEvent, PingEvent, TextDelta
from cortex_core.openai.chat import ChatCompletionChunk, ChoiceDelta, ChunkChoice
from cortex_core.sse import OPENAI_DONE, SSEDecoder, SSEMessage, encode_data, encode_event, event_name


def test_openai_frames_are_bare_data() -> None:
    chunk = ChatCompletionChunk(id="c", model="m", choices=[ChunkChoice(delta=ChoiceDelta(content="hi"))])
    assert encode_data(chunk) == (
        b'data: {"id":"c","object":"chat.completion.chunk","created":0,"model":"m",'
        b'"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\n'
    )
    assert OPENAI_DONE == b"data: [DONE]\n\n"


def test_named_frames_carry_the_type_twice() -> None:
    assert encode_event(PingEvent()) == b'event: ping\ndata: {"type":"ping"}\n\n'
    assert encode_event(MessageStopEvent()) == b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    with pytest.raises(TypeError):
        event_name(ChoiceDelta())
    assert event_name(TextDelta(text="x")) == "text_delta"


STREAM = (
    b": keep-alive\n\n"
    b'event: message_start\ndata: {"a": 1}\n\n'
    b"data: line1\r\ndata: line2\r\n\r\n"
    b"id: 7\nretry: 10\ndata:no-space\n\n"
    b"data: [DONE]\r\r"
)
EXPECTED = [
    SSEMessage(data='{"a": 1}', event="message_start"),
    SSEMessage(data="line1\nline2"),
    SSEMessage(data="no-space"),
    SSEMessage(data="[DONE]"),
]


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 1000])
def test_decoder_is_independent_of_chunk_boundaries(piece: int) -> None:
    decoder = SSEDecoder()
    messages = []
    for start in range(0, len(STREAM), piece):
        messages += decoder.feed(STREAM[start : start + piece])
    messages += decoder.close()
    assert messages == EXPECTED


def test_decoder_flushes_an_unterminated_last_message() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: {}\n\ndata: tail") == [SSEMessage(data="{}")]
    assert decoder.close() == [SSEMessage(data="tail")]


def test_decoder_keeps_multibyte_characters_split_across_chunks() -> None:
    encoded = "data: héllo 🌍\n\n".encode()
    decoder = SSEDecoder()
    messages = []
    for byte in encoded:
        messages += decoder.feed(bytes([byte]))
    assert messages == [SSEMessage(data="héllo 🌍")]
