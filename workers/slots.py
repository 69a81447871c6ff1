"""Free job slots: fetch one message per free slot, never more."""

from __future__ import annotations

import asyncio
from collections import deque


class SlotPool:
    """Counts free slots; ``take`` waits for at least one and takes up to ``most``.

    Takers are served first come, first served: a worker binding several models runs one
    fetch loop per model, and a loop that gives a slot back and at once asks again must
    not starve the others (it would, with a bare condition: it re-acquires the lock first).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.free = size
        self._changed = asyncio.Condition()
        self._waiting: deque[object] = deque()

    @property
    def busy(self) -> int:
        """Slots in use."""
        return self.size - self.free

    async def take(self, most: int) -> int:
        """Wait until a slot is free and every earlier taker is served, then take as many as are
        free, up to ``most``."""
        me = object()
        async with self._changed:
            self._waiting.append(me)
            try:
                await self._changed.wait_for(lambda: self.free > 0 and self._waiting[0] is me)
            finally:
                self._waiting.remove(me)
                self._changed.notify_all()  # the next in line may be able to take what is left
            n = min(self.free, most)
            self.free -= n
            return n

    async def give(self, n: int = 1) -> None:
        """Return ``n`` slots."""
        async with self._changed:
            self.free += n
            self._changed.notify_all()
