"""Which region's queue takes a job, and what happens to jobs of a region that is lost.

In a super-cluster every region has its own queue (``JOBS_<region>``). A job goes to the
region the request arrived in (the edge's own) while that region has live capacity for the
model: its live workers have more slots than the jobs waiting and running there. Otherwise
it spills to the region with the most spare slots; when no region has a spare slot it
stays home if home has a worker of the model at all, and otherwise goes to the region
whose queue is shortest per slot. A model that only one region serves is served from there.

What the choice reads: the worker registry (every region's, ``edge.fleet``: the slots of
each live worker of the model) and each region's load, polled every ``region_poll_s`` from
its model consumers (jobs pending plus jobs a worker holds), plus the jobs this edge placed
there since that poll. Other edges' jobs show up at the next poll: placement is a good
guess, and a wrong one costs a wait in a queue, never a job.

A region whose JetStream does not answer a poll (its servers are gone, or its gateway) is
*down*: nothing is placed there. Once it has been down for ``region_lost_s``, every open
job placed there is placed again, in a live region, under the same id and reply subject,
its attempts counted on from a higher base (``Headrace-Attempt-Base``) so that its events
supersede the lost region's and the relay skips the text the client already has (as for a
redelivery). The lost region's copy is deleted from its queue once it is back, so it does
not run there a second time. A region that comes back answers the poll
again and is placed into again, without anyone stepping in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from edge.fleet import Fleet
from edge.metrics import EdgeMetrics
from schemas.client import JobClient, JobStream, Placed
from schemas.errors import NoWorker
from schemas.subjects import Header, JobKind, consumer_name, jobs_stream

log = logging.getLogger(__name__)

# Attempt numbers of a job's n-th placement start at n * ATTEMPTS_PER_PLACEMENT (a job is
# never delivered this often: max_deliver is a handful).
ATTEMPTS_PER_PLACEMENT = 100


@dataclass
class RegionState:
    """What the edge knows of one region."""

    name: str
    down_since: float | None = None  # monotonic; None while it answers
    depth: dict[str, int] = field(default_factory=dict)  # consumer -> jobs waiting or running
    mine_at_poll: dict[str, int] = field(default_factory=dict)  # this edge's among them
    reserved: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # being placed

    @property
    def up(self) -> bool:
        """True while its JetStream answers."""
        return self.down_since is None


@dataclass
class Stale:
    """A copy of a re-placed job left in a lost region's queue: deleted once it is back."""

    region: str
    seq: int
    job_id: str
    until: float  # give up after the job's deadline (it expires in the queue anyway)


class Placement:
    """Chooses the region of each job and re-places the jobs of a lost region."""

    def __init__(
        self,
        js: JetStreamContext,
        fleet: Fleet,
        jobs: JobClient,
        metrics: EdgeMetrics,
        *,
        region: str,
        regions: tuple[str, ...],
        poll_s: float = 1.0,
        lost_s: float = 2.0,
    ) -> None:
        self.js = js
        self.fleet = fleet
        self.jobs = jobs
        self.metrics = metrics
        self.region = region
        self.states = {r: RegionState(r) for r in regions}
        self.poll_s = poll_s
        self.lost_s = lost_s
        self._stale: list[Stale] = []
        self._task: asyncio.Task[None] | None = None
        self._replacing: set[asyncio.Task[None]] = set()

    # -- choosing ------------------------------------------------------------------------

    def choose(self, kind: JobKind, model: str) -> str:
        """The region whose queue takes the next job for ``model`` (see the module docstring).

        The job is reserved in that region's load at once (``release`` once it is published
        or failed), so requests arriving together spread out before a poll shows them.
        """
        consumer = consumer_name(kind, model)
        slots: dict[str, int] = defaultdict(int)
        for w in self.fleet.live():
            if w.region in self.states and any(m.id == model and m.kind == kind for m in w.models):
                slots[w.region] += w.slots
        live = [r for r in slots if self.states[r].up]
        if not live:
            raise NoWorker(f"No region has a live worker for '{model}' right now; retry shortly")
        mine = self._open(consumer)

        def load(r: str) -> int:  # jobs waiting or running there
            s = self.states[r]
            others = s.depth.get(consumer, 0) - s.mine_at_poll.get(consumer, 0)
            return max(0, others) + mine[r] + s.reserved[consumer]

        def spare(r: str) -> int:
            return slots[r] - load(r)

        home = self.region
        roomy = [r for r in live if spare(r) > 0]
        if home in roomy:
            chosen = home
        elif roomy:
            chosen = min(roomy, key=lambda r: (-spare(r), r))
        elif home in live:
            chosen = home
        else:
            chosen = min(live, key=lambda r: (load(r) / slots[r], r))
        self.states[chosen].reserved[consumer] += 1
        log.debug("placing %s in %s (slots %s, load %s)", consumer, chosen, dict(slots),
                  {r: load(r) for r in live})  # fmt: skip
        return chosen

    def release(self, kind: JobKind, model: str, region: str, *, published: bool) -> None:
        """End ``choose``'s reservation; count a published job (and a spill)."""
        reserved = self.states[region].reserved
        consumer = consumer_name(kind, model)
        reserved[consumer] = max(0, reserved[consumer] - 1)
        if published:
            self.metrics.region_placed.labels(region).inc()
            if region != self.region:
                self.metrics.region_spills.labels(self.region, region).inc()

    def _open_all(self, region: str) -> dict[str, int]:
        """This edge's open jobs in ``region``, by consumer."""
        out: dict[str, int] = defaultdict(int)
        for stream in self.jobs.open:
            placed = stream.placed
            if placed is not None and not stream.finished and placed.region == region:
                out[consumer_name(placed.job.kind, placed.job.model)] += 1
        return out

    def _open(self, consumer: str) -> dict[str, int]:
        """This edge's own jobs of ``consumer`` that are open now, by region: known exactly,
        unlike other edges' (which only the poll shows)."""
        out: dict[str, int] = defaultdict(int)
        for stream in self.jobs.open:
            placed = stream.placed
            if placed is None or stream.finished or placed.region is None:
                continue
            if consumer_name(placed.job.kind, placed.job.model) == consumer:
                out[placed.region] += 1
        return out

    def unreachable(self, region: str) -> None:
        """A publish to ``region`` found no JetStream there: treat it as down until it answers."""
        state = self.states[region]
        if state.up:
            log.warning("region %s does not answer; placing elsewhere", region)
            state.down_since = time.monotonic()

    def live_regions(self) -> list[str]:
        """Regions that answer now."""
        return [r for r, s in self.states.items() if s.up]

    # -- watching ------------------------------------------------------------------------

    def start(self) -> None:
        """Poll regions and handle lost ones in the background until stop()."""
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop polling."""
        for task in [self._task, *self._replacing]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _run(self) -> None:
        while True:
            await asyncio.gather(*(self._poll(s) for s in self.states.values()))
            for s in self.states.values():
                lost = s.down_since is not None and time.monotonic() - s.down_since >= self.lost_s
                if lost:
                    self._replace_open(s.name)
            await self._clean_stale()
            await asyncio.sleep(self.poll_s)

    async def _poll(self, state: RegionState) -> None:
        """Read the region's queue depth per model; a region that does not answer is down."""
        before = self._open_all(state.name)  # this edge's jobs there as the poll starts
        try:
            async with asyncio.timeout(max(self.poll_s, 0.5)):
                infos = await self.js.consumers_info(jobs_stream(state.name))
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as e:
            if state.up:
                log.warning("region %s does not answer (%s)", state.name, type(e).__name__)
                state.down_since = time.monotonic()
            return
        if not state.up:
            log.info("region %s answers again", state.name)
        state.down_since = None
        # Waiting, and fetched by a worker (running): the region's load per model.
        state.depth = {i.name: (i.num_pending or 0) + (i.num_ack_pending or 0) for i in infos}
        # This edge's own jobs among them, known exactly (``_open``): those that finished
        # while the poll was on its way may or may not be counted; taken as counted.
        after = self._open_all(state.name)
        state.mine_at_poll = {
            i.name: max(before.get(i.name, 0), after.get(i.name, 0)) for i in infos
        }
        for i in infos:
            self.metrics.region_queue_depth.labels(state.name, i.name).set(i.num_pending or 0)

    def _replace_open(self, lost: str) -> None:
        for stream in list(self.jobs.open):
            placed = stream.placed
            if stream.finished or placed is None or placed.region != lost:
                continue
            if any(t.get_name() == stream.job_id for t in self._replacing):
                continue
            task = asyncio.create_task(self._replace(stream, placed), name=stream.job_id)
            self._replacing.add(task)
            task.add_done_callback(self._replacing.discard)

    async def _replace(self, stream: JobStream, placed: Placed) -> None:
        """Publish the job again in a live region; remember the lost copy for deletion."""
        job = placed.job
        try:
            target = self.choose(job.kind, job.model)
        except NoWorker:
            return  # no live region has the model now: tried again at the next poll
        if target == placed.region:
            return
        base = int(placed.headers.get(Header.ATTEMPT_BASE, "0") or 0) + ATTEMPTS_PER_PLACEMENT
        headers = {**placed.headers, Header.ATTEMPT_BASE: str(base)}
        try:
            ack = await self.jobs.publish(
                job, reply=placed.reply, headers=headers, place=target, attempts=2
            )
        except Exception as e:  # Unavailable, QueueFull, NATS away: the next poll tries again
            self.release(job.kind, job.model, target, published=False)
            log.warning("job %s: placing it again failed (%s)", job.id, type(e).__name__)
            return
        self.release(job.kind, job.model, target, published=True)
        if stream.finished:  # it finished meanwhile after all: undo
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, TimeoutError):
                await self.js.delete_msg(jobs_stream(target), ack.seq)
            return
        stream.placed = Placed(job, placed.reply, headers, ack.seq, target)
        deadline_ms = job.deadline_ms or int(time.time() * 1000) + 3_600_000
        self._stale.append(Stale(placed.region or "", placed.seq, job.id, deadline_ms / 1000))
        self.metrics.region_replaced.labels(placed.region or "", target).inc()
        log.warning("job %s: region %s is lost; placed again in %s", job.id, placed.region, target)

    async def _clean_stale(self) -> None:
        """Delete the copies of re-placed jobs from regions that answer again. (Not cancelled:
        a cancel names the job id, and would stop the new placement too. A worker of that
        region that fetched the copy before the loss and goes on with it publishes events of
        lower attempts, which followers drop as superseded.)"""
        keep: list[Stale] = []
        for stale in self._stale:
            if time.time() > stale.until:
                continue
            if not self.states[stale.region].up:
                keep.append(stale)
                continue
            try:
                await self.js.delete_msg(jobs_stream(stale.region), stale.seq)
            except nats.js.errors.NotFoundError:
                pass  # already gone: run and acked, or expired
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
                keep.append(stale)
                continue
        self._stale = keep
