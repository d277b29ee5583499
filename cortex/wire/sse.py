"""Server-sent events: encoding frames and parsing them incrementally.

Only what the OpenAI and Anthropic streams use: ``event`` and ``data`` fields.
``id`` and ``retry`` are parsed and ignored.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

DONE = b"data: [DONE]\n\n"
#: A comment line: it keeps a stream from looking idle and carries no
#: event, so clients skip it (the openai SDKs, python and node, do).
KEEP_ALIVE = b": keep-alive\n\n"


def encode(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    """Encode one SSE frame.

    Args:
      data: a JSON-able dict (written compactly) or a raw string.
      event: the ``event:`` name; Anthropic clients dispatch on it and drop
        frames without one, OpenAI chat streams send none.
    """
    text = (
        data
        if isinstance(data, str)
        else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    )
    head = f"event: {event}\n" if event is not None else ""
    # A newline inside a raw string must become several data lines, or the
    # frame would end early; compact JSON never contains one.
    body = "".join(f"data: {line}\n" for line in text.split("\n"))
    return f"{head}{body}\n".encode()


@attrs.frozen
class Event:
    """One dispatched SSE event."""

    event: str | None
    data: str


class SSEDecoder:
    """Incremental SSE parser: feed it bytes as they arrive, get whole events.

    Frames may be split anywhere, even inside a multi-byte character or
    between the ``\\r`` and ``\\n`` of a line ending.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._event: str | None = None
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[Event]:
        """Add bytes; return the events they complete, in order."""
        self._buffer += chunk
        events: list[Event] = []
        while True:
            line = self._next_line()
            if line is None:
                return events
            event = self._process(line)
            if event is not None:
                events.append(event)

    def _next_line(self) -> str | None:
        buf = self._buffer
        cr, lf = buf.find(b"\r"), buf.find(b"\n")
        if cr == -1 and lf == -1:
            return None
        if cr != -1 and (lf == -1 or cr < lf):
            if cr == len(buf) - 1:
                # A lone trailing CR may be the first half of CRLF: wait.
                return None
            end, skip = cr, 2 if buf[cr + 1 : cr + 2] == b"\n" else 1
        else:
            end, skip = lf, 1
        self._buffer = buf[end + skip :]
        return buf[:end].decode("utf-8", errors="replace")

    def _process(self, line: str) -> Event | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        field, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "event":
            self._event = value
        elif field == "data":
            self._data.append(value)
        return None

    def _dispatch(self) -> Event | None:
        event, data = self._event, self._data
        self._event, self._data = None, []
        # Per the SSE spec an event with no data lines is not dispatched.
        if not data:
            return None
        return Event(event=event, data="\n".join(data))
