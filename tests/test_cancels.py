"""The cancel book: stop tokens of running jobs, and a bounded, expiring memory of cancels."""

from __future__ import annotations

import pytest

from workers import cancels
from workers.cancels import CancelBook


class Clock:
    """Stands in for ``time`` in workers.cancels: the test moves ``now``."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(cancels, "time", fake)  # only the module's name: the real clock is left
    return fake


def test_a_cancel_for_a_job_not_running_here_is_remembered(clock: Clock) -> None:
    book = CancelBook(memory_s=600)
    assert book.cancel("queued") is False
    assert book.was_cancelled("queued")
    assert not book.was_cancelled("other")


def test_a_running_job_is_told_to_stop(clock: Clock) -> None:
    book = CancelBook()
    token = book.track("job")
    other = book.track("other")
    assert not token.is_set()
    assert book.cancel("job") is True
    assert token.is_set()
    assert not other.is_set()


def test_a_forgotten_job_is_no_longer_told(clock: Clock) -> None:
    book = CancelBook()
    token = book.track("job")
    book.forget("job")
    assert book.cancel("job") is False
    assert not token.is_set()
    assert book.was_cancelled("job")  # still remembered, should it be delivered again
    book.forget("never-tracked")  # harmless


def test_a_cancel_is_forgotten_after_the_memory_window(clock: Clock) -> None:
    book = CancelBook(memory_s=600)
    book.cancel("job")
    clock.now += 600
    assert book.was_cancelled("job")  # the window's end is still inside it
    clock.now += 0.001
    assert not book.was_cancelled("job")


def test_cancelling_again_restarts_the_window(clock: Clock) -> None:
    book = CancelBook(memory_s=600)
    book.cancel("again")
    book.cancel("once")
    clock.now += 500
    book.cancel("again")
    clock.now += 500
    assert book.was_cancelled("again")
    assert not book.was_cancelled("once")


def test_expired_cancels_are_dropped_not_kept(clock: Clock) -> None:
    book = CancelBook(memory_s=600)
    for i in range(100):
        book.cancel(f"old-{i}")
    clock.now += 601
    book.cancel("new")
    assert len(book._cancelled) == 1  # memory stays bounded by the window, not by traffic
    assert book.was_cancelled("new")


def test_the_memory_keeps_only_the_newest_cancels(clock: Clock) -> None:
    book = CancelBook(memory_s=600, max_remembered=2)
    book.cancel("a")
    book.cancel("b")
    book.cancel("a")  # renewed: now the newest
    book.cancel("c")
    assert [book.was_cancelled(j) for j in "abc"] == [True, False, True]
