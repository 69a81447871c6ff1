"""The slot pool: how many jobs a worker fetches, shared fairly by its fetch loops."""

from __future__ import annotations

import asyncio
import contextlib

from workers.slots import SlotPool


async def settle() -> None:
    """Let every ready task run until it waits (a few loop turns, no sleeping)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def test_a_new_pool_is_all_free() -> None:
    pool = SlotPool(3)
    assert (pool.size, pool.free, pool.busy) == (3, 3, 0)


async def test_take_takes_what_is_free_up_to_most_and_give_returns_it() -> None:
    pool = SlotPool(4)
    assert await pool.take(3) == 3
    assert (pool.free, pool.busy) == (1, 3)
    assert await pool.take(3) == 1  # only one was left
    assert (pool.free, pool.busy) == (0, 4)
    await pool.give(2)
    assert (pool.free, pool.busy) == (2, 2)
    await pool.give()  # one by default
    assert (pool.free, pool.busy, pool.size) == (3, 1, 4)


async def test_take_waits_until_a_slot_is_given_back() -> None:
    pool = SlotPool(1)
    await pool.take(1)
    taker = asyncio.create_task(pool.take(1))
    await settle()
    assert not taker.done()
    await pool.give(1)
    assert await asyncio.wait_for(taker, 1) == 1
    assert pool.free == 0


async def test_waiting_takers_are_served_first_come_first_served() -> None:
    pool = SlotPool(1)
    await pool.take(1)
    served: list[str] = []

    async def taker(name: str) -> None:
        await pool.take(1)
        served.append(name)

    tasks = []
    for name in "abcd":
        tasks.append(asyncio.create_task(taker(name)))
        await settle()  # each one is waiting before the next arrives
    for _ in "abcd":
        await pool.give(1)
        await settle()
    await asyncio.wait_for(asyncio.gather(*tasks), 1)
    assert served == list("abcd")


async def test_giving_back_and_asking_again_at_once_does_not_jump_the_line() -> None:
    # Two models' fetch loops: one gives its slot back and asks again without yielding in
    # between. With a bare condition it would take the slot again before the other woke.
    pool = SlotPool(1)
    await pool.take(1)
    other = asyncio.create_task(pool.take(1))
    await settle()

    async def give_and_take_again() -> int:
        await pool.give(1)
        return await pool.take(1)

    again = asyncio.create_task(give_and_take_again())
    assert await asyncio.wait_for(other, 1) == 1
    await settle()
    assert not again.done()  # behind the one that was waiting
    await pool.give(1)
    assert await asyncio.wait_for(again, 1) == 1


async def test_what_the_first_in_line_leaves_goes_to_the_next() -> None:
    pool = SlotPool(3)
    await pool.take(3)
    first = asyncio.create_task(pool.take(1))
    await settle()
    second = asyncio.create_task(pool.take(5))
    await settle()
    await pool.give(3)
    assert await asyncio.wait_for(first, 1) == 1
    assert await asyncio.wait_for(second, 1) == 2
    assert pool.free == 0


async def test_a_cancelled_taker_leaves_the_line() -> None:
    pool = SlotPool(1)
    await pool.take(1)
    first = asyncio.create_task(pool.take(1))
    await settle()
    second = asyncio.create_task(pool.take(1))
    await settle()
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first
    await pool.give(1)
    assert await asyncio.wait_for(second, 1) == 1  # not stuck behind the one that left
    assert pool.free == 0
