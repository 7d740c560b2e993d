"""Server-sent events: framing for both dialects and an incremental decoder.

OpenAI chat/completions streams are bare `data: {json}\\n\\n` frames ending in
`data: [DONE]\\n\\n`. Anthropic and the Responses API name each frame:
`event: <type>\\ndata: {json}\\n\\n`, where the JSON also carries `"type": <type>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

OPENAI_DONE = b"data: [DONE]\n\n"


def encode_data(obj: object) -> bytes:
    """An unnamed frame (OpenAI chat and completions chunks)."""
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


def event_name(event: msgspec.Struct) -> str:
    """The `type` tag of a tagged event Struct (Anthropic and Responses events)."""
    tag = event.__struct_config__.tag
    if not isinstance(tag, str):
        raise TypeError(f"{type(event).__name__} is not a tagged event type")
    return tag


def encode_event(event: msgspec.Struct) -> bytes:
    """A named frame: `event: <type>` then the JSON (Anthropic and Responses streams)."""
    return b"event: " + event_name(event).encode() + b"\ndata: " + msgspec.json.encode(event) + b"\n\n"


@dataclass(frozen=True, slots=True)
class SSEMessage:
    data: str
    event: str | None = None


@dataclass(slots=True)
class SSEDecoder:
    """Turns a byte stream into SSE messages, whatever the chunk boundaries and line endings.

    Follows the WHATWG rules we need: lines end in LF, CRLF or CR; a blank line dispatches;
    `data` lines join with LF; comments (`:` keep-alives) and unknown fields are ignored.
    """

    _buffer: bytearray = field(default_factory=bytearray)
    _data: list[str] = field(default_factory=list)
    _event: str | None = None

    def feed(self, chunk: bytes) -> list[SSEMessage]:
        self._buffer += chunk
        messages: list[SSEMessage] = []
        while True:
            line = self._next_line()
            if line is None:
                return messages
            message = self._take_line(line)
            if message is not None:
                messages.append(message)

    def close(self) -> list[SSEMessage]:
        """Flush at end of stream: a last message without its blank line still counts."""
        messages: list[SSEMessage] = []
        if self._buffer:
            rest = bytes(self._buffer).rstrip(b"\r")
            self._buffer.clear()
            message = self._take_line(rest.decode("utf-8", errors="replace"))
            if message is not None:
                messages.append(message)
        final = self._take_line("")
        if final is not None:
            messages.append(final)
        return messages

    def _next_line(self) -> str | None:
        buf = self._buffer
        lf, cr = buf.find(b"\n"), buf.find(b"\r")
        if lf < 0 and cr < 0:
            return None
        if cr < 0 or 0 <= lf < cr:
            end, skip = lf, 1
        elif cr + 1 == len(buf):
            return None  # a CR at the very end may be the first half of CRLF: wait for more
        else:
            end, skip = cr, 2 if buf[cr + 1] == 0x0A else 1
        line = bytes(buf[:end]).decode("utf-8", errors="replace")
        del buf[: end + skip]
        return line

    def _take_line(self, line: str) -> SSEMessage | None:
        if line == "":
            if not self._data:
                self._event = None
                return None
            message = SSEMessage(data="\n".join(self._data), event=self._event)
            self._data = []
            self._event = None
            return message
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None
