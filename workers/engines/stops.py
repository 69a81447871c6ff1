"""Stop sequences: generated text is released only once it cannot be the start of a stop string."""

from __future__ import annotations

from collections.abc import Sequence


class StopHoldback:
    """Feeds on generated text and releases what is safe to send.

    A stop string may arrive split over several tokens ("<|", "end", "|>"), so
    any tail of the text that is a prefix of a stop string is held back until
    the next piece decides it. The client never sees a partial stop sequence,
    and never sees the stop string itself or anything after it.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]  # an empty stop string would stop at once
        self.stopped = False
        self.word: str | None = None  # the stop string that matched
        self._pending = ""

    @property
    def pending(self) -> str:
        """Text held back because a stop string may be starting."""
        return self._pending

    def push(self, text: str) -> str:
        """Add generated text; return what may be sent now (``stopped`` tells if a stop matched)."""
        if self.stopped:
            return ""
        self._pending += text
        if not self.stops:
            out, self._pending = self._pending, ""
            return out
        hits = [(i, s) for s in self.stops if (i := self._pending.find(s)) >= 0]
        if hits:
            at, self.word = min(hits, key=lambda hit: hit[0])
            out = self._pending[:at]
            self._pending = ""
            self.stopped = True
            return out
        cut = len(self._pending) - self._partial_stop()
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def flush(self) -> str:
        """Generation ended without a stop string: what was held back is plain text after all."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out

    def _partial_stop(self) -> int:
        """Length of the longest tail of the pending text that a stop string starts with."""
        text = self._pending
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
