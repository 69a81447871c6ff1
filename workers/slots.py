"""Free job slots: fetch one message per free slot, never more."""

from __future__ import annotations

import asyncio


class SlotPool:
    """Counts free slots; ``take`` waits for at least one and takes up to ``most``."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.free = size
        self._changed = asyncio.Condition()

    @property
    def busy(self) -> int:
        """Slots in use."""
        return self.size - self.free

    async def take(self, most: int) -> int:
        """Wait until a slot is free, then take as many as are free, up to ``most``."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.free > 0)
            n = min(self.free, most)
            self.free -= n
            return n

    async def give(self, n: int = 1) -> None:
        """Return ``n`` slots."""
        async with self._changed:
            self.free += n
            self._changed.notify_all()
