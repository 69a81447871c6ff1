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
*down*: nothing is placed there. Moving a job away from a region is a hand-over
(``schemas.failover``), the same as when a worker is lost: the job's stream publishes a
continuation of what the client already has, in the next epoch, into a live region's
queue, after writing the job's fence in the submitter's region's RESULTS. A running job
whose worker's beats stop (its region went with it) is handed over by its stream within
a second, into a live region (``continue_in``); once a region has been down for
``region_lost_s``, every open job still placed there (waiting in its queue, so nothing
beats for it) is handed over too (``hand_over_from``). A lost region's worker that fetches
an old copy after it is back reads the fence and terminates it unrun; the old copies are
also deleted from that region's queue once it answers. A region that comes back answers
the poll again and is placed into again, without anyone stepping in.
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
from schemas.jobs import AnyJob
from schemas.subjects import consumer_name, jobs_stream, queue_kind

log = logging.getLogger(__name__)


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
    """A copy of a job handed over away from a region: deleted once that region answers."""

    region: str
    seq: int
    job_id: str
    until: float  # give up after the job's deadline (it expires in the queue anyway)


class Placement:
    """Chooses the region of each job and hands over the jobs of a lost region
    (``schemas.client.Placer``: where a job's continuation goes)."""

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

    def choose(self, kind: str, model: str) -> str:
        """The region whose queue takes the next job for ``model`` (see the module docstring).

        The job is reserved in that region's load at once (``release`` once it is published
        or failed), so requests arriving together spread out before a poll shows them.
        """
        qk = queue_kind(kind)  # an embedding job rides its model's text queue
        consumer = consumer_name(qk, model)
        slots: dict[str, int] = defaultdict(int)
        for w in self.fleet.live():
            if w.region in self.states and any(m.id == model and m.kind == qk for m in w.models):
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

    def release(self, kind: str, model: str, region: str, *, published: bool) -> None:
        """End ``choose``'s reservation; count a published job (and a spill)."""
        reserved = self.states[region].reserved
        consumer = consumer_name(queue_kind(kind), model)
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
                out[consumer_name(queue_kind(placed.job.kind), placed.job.model)] += 1
        return out

    def _open(self, consumer: str) -> dict[str, int]:
        """This edge's own jobs of ``consumer`` that are open now, by region: known exactly,
        unlike other edges' (which only the poll shows)."""
        out: dict[str, int] = defaultdict(int)
        for stream in self.jobs.open:
            placed = stream.placed
            if placed is None or stream.finished or placed.region is None:
                continue
            if consumer_name(queue_kind(placed.job.kind), placed.job.model) == consumer:
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

    # -- handing over ------------------------------------------------------------------

    def continue_in(self, job: AnyJob, region: str | None) -> str | None:
        """Where a continuation of ``job`` goes: the region it was in while that answers,
        else the region ``choose`` picks among the live ones (it stays when none has the
        model: its publish fails, and it is tried again)."""
        if region is not None and region in self.states and self.states[region].up:
            return region
        try:
            target = self.choose(job.kind, job.model)
        except NoWorker:
            return region
        self.release(job.kind, job.model, target, published=False)
        return target

    def moved(self, job: AnyJob, source: Placed, target: str | None) -> None:
        """A continuation went to ``target``: count it, and delete the old copy from
        ``source``'s region once it answers (its fence would stop it anyway)."""
        if source.region is None or target is None:
            return
        deadline_ms = job.deadline_ms or int(time.time() * 1000) + 3_600_000
        self._stale.append(Stale(source.region, source.seq, job.id, deadline_ms / 1000))
        self.metrics.region_replaced.labels(source.region, target).inc()
        log.warning("job %s: region %s is lost; continued in %s", job.id, source.region, target)

    def _replace_open(self, lost: str) -> None:
        for stream in list(self.jobs.open):
            placed = stream.placed
            if stream.finished or placed is None or placed.region != lost:
                continue
            if any(t.get_name() == stream.job_id for t in self._replacing):
                continue
            task = asyncio.create_task(self._replace(stream, lost), name=stream.job_id)
            self._replacing.add(task)
            task.add_done_callback(self._replacing.discard)

    async def _replace(self, stream: JobStream, lost: str) -> None:
        """Hand the job over into a live region (``JobStream.hand_over_from``)."""
        try:
            await stream.hand_over_from(lost)
        except Exception as e:  # NATS away, no live region, too many hand-overs: next poll
            log.warning("job %s: handing it over failed (%s)", stream.job_id, type(e).__name__)

    async def _clean_stale(self) -> None:
        """Delete the copies of handed-over jobs from regions that answer again. (Not
        cancelled: a cancel names the job id, and would stop the continuation too. A worker
        of that region that fetched the copy before the loss and goes on with it publishes
        events of an older epoch, which followers drop; one that fetches it now reads the
        fence and terminates it.)"""
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
