"""The thread-to-event-loop stream the engines share: order, coalescing, errors, a closed loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from workers.engines.thread_stream import ThreadStream


async def drain(stream: ThreadStream[int, str]) -> list[list[int]]:
    return [batch async for batch in stream.batches()]


def counting(n: int, result: str = "done") -> Callable[[Callable[[int], None]], str]:
    def fn(send: Callable[[int], None]) -> str:
        for i in range(n):
            send(i)
        return result

    return fn


async def test_items_arrive_in_order_then_the_result() -> None:
    stream: ThreadStream[int, str] = ThreadStream()
    thread = threading.Thread(target=stream.work(counting(500)))
    thread.start()
    batches = await drain(stream)
    thread.join()
    assert [i for b in batches for i in b] == list(range(500))
    assert all(batches)  # never an empty batch
    assert stream.result == "done"


async def test_what_queued_up_meanwhile_comes_as_one_batch() -> None:
    stream: ThreadStream[int, str] = ThreadStream()
    thread = threading.Thread(target=stream.work(counting(3)))
    thread.start()
    await asyncio.to_thread(thread.join)  # everything is queued before the first read
    assert await drain(stream) == [[0, 1, 2]]


async def test_a_result_alone_ends_the_batches_without_an_empty_one() -> None:
    stream: ThreadStream[int, str] = ThreadStream()
    await asyncio.to_thread(stream.work(counting(0, "nothing")))
    assert await drain(stream) == []
    assert stream.result == "nothing"


async def test_the_threads_exception_is_raised_after_its_items() -> None:
    def failing(send: Callable[[int], None]) -> str:
        send(1)
        send(2)
        raise ValueError("boom")

    stream: ThreadStream[int, str] = ThreadStream()
    await asyncio.to_thread(stream.work(failing))
    batches = stream.batches()
    assert await anext(batches) == [1, 2]
    with pytest.raises(ValueError, match="boom"):
        await anext(batches)


def test_a_thread_outliving_its_loop_finishes_quietly() -> None:
    async def make() -> ThreadStream[int, str]:
        return ThreadStream()

    stream = asyncio.run(make())  # the loop is closed when this returns
    stream.work(counting(3))()  # sends and hands its result to nobody, raising nothing


def paced(n: int, every_s: float) -> Callable[[Callable[[int], None]], str]:
    def fn(send: Callable[[int], None]) -> str:
        for i in range(n):
            send(i)
            time.sleep(every_s)
        return "done"

    return fn


@pytest.mark.parametrize("interval_s", [0.0, 0.1])
async def test_an_interval_hands_items_over_at_most_that_often(interval_s: float) -> None:
    stream: ThreadStream[int, str] = ThreadStream(interval_s)
    thread = threading.Thread(target=stream.work(paced(60, 0.005)))  # about 0.3 s of items
    thread.start()
    batches = await drain(stream)  # read as they come: a consumer that keeps up
    thread.join()
    assert [i for b in batches for i in b] == list(range(60))
    assert batches[0] == [0]  # the first item goes at once
    if interval_s:
        assert len(batches) <= 6  # 0.3 s in 0.1 s intervals, and the rest with the result
    else:
        assert len(batches) > 20  # every item woke the loop


async def test_flush_hands_over_what_is_held_before_the_thread_ends() -> None:
    stream: ThreadStream[int, str] = ThreadStream(interval_s=60.0)
    first_read, release = threading.Event(), threading.Event()

    def fn(send: Callable[[int], None]) -> str:
        send(1)  # at once
        first_read.wait(10)
        send(2)  # held: the interval has not passed
        send(3)
        stream.flush()
        release.wait(10)
        return "done"

    thread = threading.Thread(target=stream.work(fn))
    thread.start()
    batches = stream.batches()
    assert await anext(batches) == [1]
    first_read.set()
    assert await asyncio.wait_for(anext(batches), 5) == [2, 3]  # before the thread returns
    release.set()
    assert [b async for b in batches] == []
    thread.join()
    assert stream.result == "done"
