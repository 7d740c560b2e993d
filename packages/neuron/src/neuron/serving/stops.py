"""Stop strings: the text before the first match is the answer; the match is never emitted.

A stop string can arrive split over several tokens ("<", "/an", "swer>"), so text that
could still become a match — the longest tail of the buffer that is a prefix of some stop
string — is held back until the next delta decides it.
"""

from __future__ import annotations

from collections.abc import Iterable


class StopStringMatcher:
    def __init__(self, stops: Iterable[str]) -> None:
        self._stops = tuple(stop for stop in stops if stop)
        self._held = ""
        self.stopped = False
        # The stop string that ended the text (reported as the choice's stop_reason).
        self.matched: str | None = None

    def _longest_partial(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:size]):
                    best = size
                    break
        return best

    def push(self, text: str) -> str:
        """Text safe to emit now; sets `stopped` once a stop string matched."""
        if self.stopped or not text:
            return ""
        if not self._stops:
            return text
        buffer = self._held + text
        matches = [(index, stop) for stop in self._stops if (index := buffer.find(stop)) >= 0]
        if matches:
            index, self.matched = min(matches, key=lambda match: match[0])
            self.stopped = True
            self._held = ""
            return buffer[:index]
        keep = self._longest_partial(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """At the end of generation a held partial match is just text."""
        held, self._held = self._held, ""
        return "" if self.stopped else held
