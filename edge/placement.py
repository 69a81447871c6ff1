"""Which region's queue takes a job, and what happens to jobs of a region that is lost.

In a super-cluster every region has its own queue (``JOBS_<region>``). A job goes to the
region the request arrived in (the edge's own) while that region has live capacity for the
model: a live worker of it and more free slots than jobs already waiting. Otherwise it
spills to the region with spare capacity and the shortest queue; when no region has spare
capacity it stays home if home has a worker of the model at all, and otherwise goes to the
region whose queue is shortest per slot. A model that only one region serves is served
from there.

What the choice reads: the worker registry (every region's, ``edge.fleet``: slots and busy
slots as of each worker's last heartbeat) and each region's queue depth, polled every
``region_poll_s`` from the model consumers, plus the jobs this edge placed since the last
poll. Both lag by up to a heartbeat and a poll: placement is a good guess, and a wrong
one costs a wait in a queue, never a job.

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
    depth: dict[str, int] = field(default_factory=dict)  # consumer -> jobs waiting
    placed: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # since the poll

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
        """The region whose queue takes the next job for ``model`` (see the module docstring)."""
        consumer = consumer_name(kind, model)
        slots: dict[str, int] = defaultdict(int)
        free: dict[str, int] = defaultdict(int)
        for w in self.fleet.live():
            if w.region in self.states and any(m.id == model and m.kind == kind for m in w.models):
                slots[w.region] += w.slots
                free[w.region] += max(0, w.slots - w.busy)
        live = [r for r in slots if self.states[r].up]
        if not live:
            raise NoWorker(f"No region has a live worker for '{model}' right now; retry shortly")

        def waiting(r: str) -> int:
            s = self.states[r]
            return s.depth.get(consumer, 0) + s.placed[consumer]

        def spare(r: str) -> int:
            return free[r] - waiting(r)

        home = self.region
        if home in live and spare(home) > 0:
            return home
        roomy = [r for r in live if spare(r) > 0]
        if roomy:
            return min(roomy, key=lambda r: (waiting(r), r != home, r))
        if home in live:
            return home
        return min(live, key=lambda r: (waiting(r) / slots[r], r))

    def placed(self, kind: JobKind, model: str, region: str) -> None:
        """Count a job placed in ``region`` (its queue is that much deeper until the poll)."""
        self.states[region].placed[consumer_name(kind, model)] += 1
        self.metrics.region_placed.labels(region).inc()
        if region != self.region:
            self.metrics.region_spills.labels(self.region, region).inc()

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
        state.depth = {i.name: i.num_pending or 0 for i in infos}
        state.placed.clear()
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
        except (nats.errors.Error, TimeoutError) as e:
            log.warning("job %s: placing it again failed (%s)", job.id, type(e).__name__)
            return
        except Exception as e:  # Unavailable, QueueFull: the next poll tries again
            log.warning("job %s: placing it again failed (%s)", job.id, type(e).__name__)
            return
        if stream.finished:  # it finished meanwhile after all: undo
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, TimeoutError):
                await self.js.delete_msg(jobs_stream(target), ack.seq)
            return
        stream.placed = Placed(job, placed.reply, headers, ack.seq, target)
        deadline_ms = job.deadline_ms or int(time.time() * 1000) + 3_600_000
        self._stale.append(Stale(placed.region or "", placed.seq, job.id, deadline_ms / 1000))
        self.placed(job.kind, job.model, target)
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
