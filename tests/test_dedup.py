"""``edge.dedup``: retried requests join the job in flight; the last one to leave cancels it."""

from __future__ import annotations

import asyncio

import pytest

from edge.dedup import Dedup, fingerprint


class Cancels:
    """Records the job ids a Dedup asks to cancel."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    async def __call__(self, job_id: str) -> None:
        self.ids.append(job_id)


def test_fingerprints_separate_keys_and_parts() -> None:
    assert fingerprint("alice", "/completion", b"{}") == fingerprint("alice", "/completion", b"{}")
    assert fingerprint("alice", "a", "b") != fingerprint("bob", "a", "b")
    assert fingerprint("alice", "ab", "c") != fingerprint("alice", "a", "bc")  # parts are framed


async def test_the_first_request_publishes_and_the_next_joins() -> None:
    dedup = Dedup(grace_s=0.05)
    first, new = dedup.join("fp")
    assert new
    second, again = dedup.join("fp")
    assert not again
    assert second is first
    assert first.watchers == 2
    assert not first.ready.done()
    dedup.published(first, ["job-1"], 1234)
    await asyncio.wait_for(second.ready, 1)
    assert (second.job_ids, second.created_s) == (["job-1"], 1234)


async def test_a_failed_publish_fails_its_joiners_and_frees_the_fingerprint() -> None:
    dedup = Dedup(grace_s=0.05)
    entry, _ = dedup.join("fp")
    joined, _ = dedup.join("fp")
    dedup.failed("fp", entry, RuntimeError("queue full"))
    with pytest.raises(RuntimeError, match="queue full"):
        await joined.ready
    _, new = dedup.join("fp")
    assert new  # a later retry publishes afresh


async def test_the_last_watcher_cancels_unfinished_jobs_after_the_grace() -> None:
    cancels = Cancels()
    dedup = Dedup(grace_s=0.05)
    entry, _ = dedup.join("fp")
    dedup.join("fp")
    dedup.published(entry, ["job-1", "job-2"], 0)
    dedup.release("fp", ["job-1", "job-2"], cancels)
    await asyncio.sleep(0.1)
    assert cancels.ids == []  # one watcher is still there
    dedup.release("fp", ["job-2"], cancels)
    assert cancels.ids == []  # not before the grace period
    await asyncio.sleep(0.15)
    assert cancels.ids == ["job-2"]
    assert "fp" not in dedup.entries


async def test_a_retry_within_the_grace_keeps_the_job_running() -> None:
    cancels = Cancels()
    dedup = Dedup(grace_s=0.1)
    entry, _ = dedup.join("fp")
    dedup.published(entry, ["job-1"], 0)
    dedup.release("fp", ["job-1"], cancels)  # the client timed out ...
    again, new = dedup.join("fp")  # ... and retried at once
    assert not new
    assert again is entry
    await asyncio.sleep(0.2)
    assert cancels.ids == []
    dedup.release("fp", [], cancels)  # finished: nothing to cancel, the entry goes
    assert "fp" not in dedup.entries
