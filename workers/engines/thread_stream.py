"""One worker thread's output handed to the event loop, in order: items, then a result or an error.

Engines run their models in threads of their own (a llama.cpp token or a
diffusion step blocks the calling thread) and stream what the thread makes to
the event loop through one of these. It is written once because each of these
is easy to get subtly wrong:

- Cancellation. A thread cannot be interrupted: it stops when it next looks at
  its stop flag. The stream does not own that flag; the engine does, and sets
  it when its consumer stops listening (the runtime closes the engine's event
  generator when it lets go of a job, at shutdown for one). What the thread
  sends after that is queued for nobody and dropped with the stream.
- Backpressure. The thread never waits for the loop: a thread blocked on a
  slow consumer would hold its llama.cpp context or the GPU. The queue is
  unbounded, yet bounded by the job (its token budget or its steps), and the
  consumer takes everything that queued up at once (``batches``), so one that
  coalesces (the llama engine's deltas) sends fewer, larger events when it
  falls behind instead of falling further behind.
- Wake-ups. Every hand-off wakes the event loop, which then competes for a core
  with the thread's own work (llama.cpp's threads, on a small machine). With
  ``interval_s`` the thread hands items over at most once per interval: the
  first item at once, later ones with the next item sent after the interval has
  passed (or with ``flush``, ``finish`` and ``fail``); they arrive as one batch.
- Closing. Once the event loop is closed, ``call_soon_threadsafe`` raises
  ``RuntimeError``: the thread's later items are dropped (nobody is listening)
  rather than failing the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


@dataclass(frozen=True, slots=True)
class _Returned(Generic[ResultT]):
    value: ResultT


@dataclass(frozen=True, slots=True)
class _Raised:
    error: Exception


class ThreadStream(Generic[ItemT, ResultT]):
    """Items sent from one thread, read on the event loop it was made on; then the thread's result.

    Make it on the loop, run ``work(fn)`` in the thread (``fn`` gets ``send``), and read
    ``batches()`` on the loop; once they end, ``result`` is what ``fn`` returned. An
    exception ``fn`` raised is raised by ``batches()`` after the items sent before it.
    """

    def __init__(self, interval_s: float = 0.0) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[ItemT | _Returned[ResultT] | _Raised] = asyncio.Queue()
        self._result: _Returned[ResultT] | None = None
        self.interval_s = interval_s  # the producing thread may change it as it goes
        self._held: list[ItemT] = []  # sent by the thread, not handed over yet
        self._due = 0.0  # monotonic time from which the next item is handed at once

    def send(self, item: ItemT) -> None:
        """Hand one item to the loop (from the thread; never blocks), or hold it with the
        ones before it until the interval has passed."""
        self._held.append(item)
        if time.monotonic() >= self._due:
            self.flush()

    def flush(self) -> None:
        """Hand over the items held back (from the thread): before the thread blocks for a while."""
        if self._held:
            held, self._held = self._held, []
            self._due = time.monotonic() + self.interval_s
            self._hand(held)

    def finish(self, result: ResultT) -> None:
        """End the stream with ``result`` (from the thread, for work not run through ``work``)."""
        self._end(_Returned(result))

    def fail(self, error: Exception) -> None:
        """End the stream with ``error``, raised to the consumer after the items sent before."""
        self._end(_Raised(error))

    def work(self, fn: Callable[[Callable[[ItemT], None]], ResultT]) -> Callable[[], None]:
        """What the thread runs: ``fn(send)``, then its result or its exception handed over."""

        def run() -> None:
            try:
                result = _Returned(fn(self.send))
            except Exception as e:  # handed to the event loop, which raises it to the consumer
                self._end(_Raised(e))
            else:
                self._end(result)

        return run

    @property
    def result(self) -> ResultT:
        """What the thread's function returned (only once ``batches()`` has ended)."""
        assert self._result is not None, "the thread has not finished"
        return self._result.value

    async def batches(self) -> AsyncGenerator[list[ItemT], None]:
        """Every item in order, in lists of what queued up meanwhile (never empty); then the
        thread's exception is raised, or the batches end once its result is in."""
        while True:
            items, end = await self._next()
            if items:
                yield items
            if isinstance(end, _Raised):
                raise end.error
            if end is not None:
                self._result = end
                return

    async def _next(self) -> tuple[list[ItemT], _Returned[ResultT] | _Raised | None]:
        """What queued up: the items, and the thread's end if it came (it is always last)."""
        items: list[ItemT] = []
        item = await self._queue.get()
        while True:
            if isinstance(item, _Returned | _Raised):
                return items, item
            items.append(item)
            if self._queue.empty():
                return items, None
            item = self._queue.get_nowait()

    def _end(self, end: _Returned[ResultT] | _Raised) -> None:
        held, self._held = self._held, []
        self._hand([*held, end])

    def _hand(self, items: Sequence[ItemT | _Returned[ResultT] | _Raised]) -> None:
        """One wake-up of the loop for the lot."""
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
            self._loop.call_soon_threadsafe(self._put, items)

    def _put(self, items: Sequence[ItemT | _Returned[ResultT] | _Raised]) -> None:
        for item in items:
            self._queue.put_nowait(item)
