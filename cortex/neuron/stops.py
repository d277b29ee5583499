"""From token bytes to text that is safe to send: UTF-8 and stop strings.

Engines hand out the bytes of each token; a character may span tokens and a
stop string may span tokens too. ``StopScanner`` releases only text that
can no longer become part of a stop string, so stop strings never leak into
the output, including across token boundaries in streams.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable


class StopScanner:
    """Assembles token pieces into text and finds the first stop string.

    Args:
      stops: strings that end the output; the earliest match wins.

    After ``feed`` returns with ``matched`` set, the output is over; the text
    returned by that call is what preceded the stop string.
    """

    def __init__(self, stops: Iterable[str] = ()) -> None:
        self.stops = tuple(dict.fromkeys(s for s in stops if s))
        self.matched: str | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""

    def feed(self, piece: bytes) -> str:
        """Add one token's bytes; return the text now safe to release."""
        return self._scan(self._held + self._decoder.decode(piece))

    def flush(self) -> str:
        """End of output: release what was held (a partial stop string).

        A character the end of output cut (``max_tokens`` reached inside a
        multi-byte character) is dropped, not released as U+FFFD.
        """
        self._decoder.reset()
        text = self._scan(self._held, final=True)
        self._held = ""
        return text

    def _scan(self, text: str, *, final: bool = False) -> str:
        first: tuple[int, str] | None = None
        for stop in self.stops:
            at = text.find(stop)
            if at >= 0 and (first is None or at < first[0]):
                first = (at, stop)
        if first is not None:
            self.matched = first[1]
            self._held = ""
            return text[: first[0]]
        keep = 0 if final else partial_suffix(text, self.stops)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]


def partial_suffix(text: str, markers: Iterable[str]) -> int:
    """Length of the longest end of ``text`` that begins some marker."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:size]):
                longest = size
                break
    return longest
