"""Continuous batching: one llama.cpp context per model, driven by one scheduler thread.

The context's KV cache has ``n_ctx`` cells per slot (``gguf.new_context``): a stream per
slot (split, the default) or one buffer for all (unified). Each step the scheduler puts
into one ``llama_decode`` batch the next
token of every running sequence and, in what room is left of ``n_batch``, chunks of the
prompts still being evaluated; then it samples every sequence whose logits came out,
each with its own sampler chain (``decode.Generation``). Jobs join and leave between
steps: a cancelled or finished sequence gives up its sequence id at once.

Split streams. Each slot's sequence id is its stream. A job takes the lowest free stream,
and when a sequence ends below running ones the highest running sequence is moved down
into its stream (a copy of its cells, ``_compact``): the running ids stay 0..n-1, and the
step is one micro-batch (llama.cpp cuts a split batch at every break in the ids, each cut
another pass over the weights). The tokens go into the batch by sequence id. A finished
sequence's cells stay in its stream as its cached prefix until a job takes the stream:
that job reuses the prefix they share, or has a longer one copied in from another free
stream, a running sequence or host memory. What a taken stream held and the job does
not keep is copied to an empty free stream, else saved to host memory.

The prefix cache, unified. A finished sequence leaves its cells behind under its sequence id
(at most ``ModelConfig.cached()`` of them, least recently used dropped first). A new job
looks for the longest prefix of its tokens that a cached or running sequence holds and
evaluates only the rest: ``llama_memory_seq_cp`` over the prefix's positions tags the same
cells with the new sequence's id too (no data is copied in a unified cache; llama.cpp
copies only whole sequences between split ones). A cached sequence that is wholly a
prefix of the new job is taken over instead (its tail, if any, removed). At least the
last known token is always evaluated: its logits are the first sample's. A cached sequence
dropped as least recently used is first copied out to host memory (``host_cache``, within
``ModelConfig.cache_ram_mib``), and copied back for a job that shares a longer prefix with
it than with anything in cells.

Room (unified). ``n_ctx`` x slots cells, and every running sequence stays within ``n_ctx`` tokens
(the token budget), so the running sequences always fit together: when ``llama_decode``
finds no room (it returns 1, having changed nothing), the least recently used cached
sequence is dropped and the step is tried again. A cached prefix never pushes out a
running sequence's cells.

Ids: ``n_seq_max`` is slots + cached (unified) or slots (split), so a job always finds a
free id.

Pacing: every delta costs a wake-up of the event loop, a message that nats-server stores
and one the edge relays, so a sequence's text is handed over at most once per
``stream_interval_s`` x the sequences running: the worker's deltas per second stay about
the same however many run (the first token of each still goes at once).

Reproducibility: reusing a prefix, or sharing a step with other sequences, changes how
the work is split (batch sizes, which cells hold what), which on the CPU can move the last
bits of the logits; greedy text can then differ after a near tie. A job with
``cache_prompt: false`` evaluates all of its prompt (it may still share steps).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import llama_cpp
from llama_cpp._internals import LlamaContext, LlamaModel

from schemas.errors import Retry
from schemas.events import Done
from schemas.jobs import TextJob
from workers.engines.decode import Generation, Piece, Signals
from workers.engines.gguf import TOKENIZER_CTX, GgufModel, ModelConfig, load_model, new_context
from workers.engines.host_cache import (
    MIN_TOKENS,
    HostCache,
    Saved,
    common_prefix,
    load_seq_state,
    seq_state,
)
from workers.engines.thread_stream import ThreadStream
from workers.queue_time import queue_ms, with_queue_ms

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(eq=False, slots=True)
class Sequence:
    """One job in the batch: its generation, its stream, and what its cells hold."""

    job: TextJob
    gen: Generation
    signals: Signals
    stream: ThreadStream[Piece, Done]
    seq_id: int = -1
    cells: list[int] = field(default_factory=list)  # the tokens in its cells, by position
    pending: list[int] = field(default_factory=list)  # known tokens still to evaluate
    next: int | None = None  # the sampled token the next step evaluates
    waited_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class _Call:
    """Other llama.cpp work for the scheduler thread (an embedding evaluation), run
    between two steps."""

    fn: Callable[[], Any]
    result: concurrent.futures.Future[Any]

    def run(self) -> None:
        if not self.result.set_running_or_notify_cancel():
            return  # its caller stopped waiting
        try:
            self.result.set_result(self.fn())
        except BaseException as e:
            self.result.set_exception(e)


class Batcher:
    """One model's context and scheduler thread; ``submit`` a ``Sequence``, read its stream."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.model: GgufModel | None = None
        self._inbox: queue.SimpleQueue[Sequence | _Call | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready: concurrent.futures.Future[GgufModel] = concurrent.futures.Future()
        self._alive = False
        # Scheduler state: touched by the scheduler thread only.
        self._running: list[Sequence] = []
        self._waiting: deque[Sequence] = deque()
        # Cached prefixes: seq id -> its tokens. Unified, their ids are taken; split, they
        # are the free streams' (in ``_free`` too).
        self._cache: OrderedDict[int, list[int]] = OrderedDict()
        self._free: list[int] = []
        self._split = not config.kv_unified
        self.host = HostCache(config.cache_ram_mib * 2**20)
        self._ctx: LlamaContext | None = None
        self.steps = 0  # llama_decode calls that succeeded
        self.tokens = 0  # tokens they evaluated
        self.moves = 0  # split: running sequences moved down to close a gap in the ids
        self.gapped = 0  # split: steps whose sequence ids had a gap (more micro-batches)

    async def start(self) -> GgufModel:
        """Load the model and its context on the scheduler thread, which then runs the steps."""
        self._thread = threading.Thread(
            target=self._main, name=f"llama-{self.config.id}", daemon=True
        )
        self._thread.start()
        self.model = await asyncio.wrap_future(self._ready)
        return self.model

    def submit(self, seq: Sequence) -> None:
        """Queue a job for the next step (from any thread)."""
        if not self._alive:
            raise Retry("the model's scheduler has stopped")
        self._inbox.put(seq)

    def call(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``fn`` on the scheduler thread between two steps (llama.cpp compute that must
        not run on another thread: an embedding context's evaluation)."""
        if not self._alive:
            raise Retry("the model's scheduler has stopped")
        call = _Call(fn, concurrent.futures.Future())
        self._inbox.put(call)
        return asyncio.wrap_future(call.result)

    async def close(self) -> None:
        """End every sequence (``cancelled``), stop the thread, free the context and weights."""
        self._alive = False
        if self._thread is not None:
            self._inbox.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    # The scheduler thread.

    def _main(self) -> None:
        weights: LlamaModel | None = None
        ctx: LlamaContext | None = None
        try:
            weights = load_model(self.config)
            model = GgufModel(self.config, weights)
            n_ctx = TOKENIZER_CTX if self.config.embedding_only else model.n_ctx
            ctx = new_context(weights, self.config, n_ctx)
        except BaseException as e:
            if weights is not None:
                weights.close()
            self._ready.set_exception(e)
            return
        capacity = max(self.config.n_batch, self.config.contexts)
        batch = llama_cpp.llama_batch_init(capacity, 0, 1)
        self._free = list(range(self.config.sequences()))[::-1]
        self._ctx = ctx
        self._alive = True
        self._ready.set_result(model)
        try:
            self._loop(ctx, batch, capacity)
        except Exception as e:  # a bug or llama.cpp failing: no sequence may hang on it
            log.exception("the scheduler of %s failed", self.config.id)
            self._alive = False
            for seq in [*self._running, *self._waiting]:
                seq.gen.sampler.close()
                seq.stream.fail(Retry(f"the model's scheduler failed ({type(e).__name__})"))
        finally:
            self._alive = False
            self._refuse_inbox()
            llama_cpp.llama_batch_free(batch)
            ctx.close()
            weights.close()

    def _refuse_inbox(self) -> None:
        """What was queued for a scheduler that has stopped: failed, so nobody waits on it."""
        stopped = Retry("the model's scheduler has stopped")
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Call):
                if item.result.set_running_or_notify_cancel():
                    item.result.set_exception(stopped)
            elif item is not None:
                item.gen.sampler.close()
                item.stream.fail(stopped)

    def _loop(self, ctx: LlamaContext, batch: llama_cpp.llama_batch, capacity: int) -> None:
        memory = ctx.memory
        while True:
            closing = self._take_inbox()
            for seq in [*self._running, *self._waiting]:
                if closing or seq.signals.is_set():  # heard before every token
                    seq.gen.cancel()
                    self._end(seq, memory)
            if closing:
                return
            while self._waiting and len(self._running) < self.config.contexts:
                self._admit(self._waiting.popleft(), memory)
            if self._split:
                self._compact(memory)
            if self._running:
                self._step(ctx, batch, capacity)

    def _take_inbox(self) -> bool:
        """Move new jobs to the waiting line (blocking while there is nothing to do); True
        once the engine is closing."""
        idle = not self._running and not self._waiting
        try:
            item = self._inbox.get() if idle else self._inbox.get_nowait()
            while True:
                if item is None:
                    return True
                if isinstance(item, _Call):
                    item.run()
                else:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return False

    def _admit(self, seq: Sequence, memory: llama_cpp.llama_memory_t) -> None:
        """Give the job a sequence id, reusing the longest prefix found in the cache."""
        known = seq.gen.known
        reuse = self._place_split(seq, memory) if self._split else self._place(seq, memory)
        if reuse:
            log.debug("job %s reuses %d of %d tokens", seq.job.id, reuse, len(known))
        seq.cells = known[:reuse]
        seq.pending = known[reuse:]
        seq.waited_ms = queue_ms(seq.job)  # waiting for a sequence is queueing too
        seq.gen.admitted(reuse)
        self._running.append(seq)

    def _place(self, seq: Sequence, memory: llama_cpp.llama_memory_t) -> int:
        """Unified: a free id, tagged onto the cells of the longest cached or running prefix
        (or a cached sequence taken over, or a saved one copied back); the tokens reused."""
        known = seq.gen.known
        reuse, source, cached = 0, -1, False
        if seq.gen.cache_prompt:
            limit = len(known) - 1  # the last known token is evaluated: its logits are needed
            for sid, tokens in self._cache.items():
                n = common_prefix(tokens, known, limit)
                if n > reuse:
                    reuse, source, cached = n, sid, True
            for other in self._running:
                n = common_prefix(other.cells, known, limit)
                if n > reuse:
                    reuse, source, cached = n, other.seq_id, False
        saved = self.host.best(known, len(known) - 1, reuse) if seq.gen.cache_prompt else None
        if saved is not None and self._restore(seq, *saved, memory):
            reuse = saved[1]
        else:
            if cached and source not in self._cache:  # dropped for a copy that found no room
                reuse, cached = 0, False
            if cached and reuse == len(self._cache[source]):
                # Wholly a prefix of the new job: take the cached sequence over.
                del self._cache[source]
                seq.seq_id = source
            else:
                seq.seq_id = self._free.pop()
                if reuse:
                    llama_cpp.llama_memory_seq_cp(memory, source, seq.seq_id, 0, reuse)
                    if cached:
                        self._cache.move_to_end(source)
        return reuse

    def _place_split(self, seq: Sequence, memory: llama_cpp.llama_memory_t) -> int:
        """Split: the lowest free stream (the running ones stay at ids 0..n-1). The job
        reuses the prefix that stream holds, or has a longer one copied in: from another
        free stream's cells, a running sequence's, or host memory. What the stream held is
        set aside first unless the job keeps all but a few tokens of it. The tokens reused."""
        assert self._ctx is not None
        known = seq.gen.known
        sid = min(self._free)
        self._free.remove(sid)
        seq.seq_id = sid
        held = self._cache.pop(sid, None) or []
        limit = len(known) - 1 if seq.gen.cache_prompt else 0
        own = common_prefix(held, known, limit)
        source, best = -1, own
        for other, tokens in [*self._cache.items(), *((s.seq_id, s.cells) for s in self._running)]:
            n = common_prefix(tokens, known, limit)
            if n > best and n >= MIN_TOKENS:
                source, best = other, n
        saved = self.host.best(known, limit, best) if limit else None
        if len(held) - own >= MIN_TOKENS:  # (a save may let ``saved`` go: it is in hand)
            # What the job drops is worth keeping (a conversation's next turn drops only
            # the last token or two of the one before: no copy then).
            self._set_aside(sid, held)
        reuse = own
        if saved is not None:
            if self.host.restore(self._ctx.ctx, saved[0], sid):
                reuse = saved[1]
                if reuse == len(saved[0].tokens):
                    self.host.discard(saved[0])
            else:
                reuse = 0
        elif source >= 0:
            reuse = best if self._copy(source, sid) else 0
            if source in self._cache:
                self._cache.move_to_end(source)
        llama_cpp.llama_memory_seq_rm(memory, sid, reuse, -1)
        return reuse

    def _set_aside(self, sid: int, held: list[int]) -> None:
        """Split: what a free stream held, about to be overwritten, outlives it: copied to an
        empty free stream if there is one (the copy is as cheap, and it stays in cells),
        else saved to host memory."""
        assert self._ctx is not None
        empty = [e for e in self._free if e not in self._cache and e != sid]
        if empty and len(held) >= MIN_TOKENS and self._copy(sid, max(empty)):
            self._cache[max(empty)] = held
            return
        self.host.save(self._ctx.ctx, sid, held)

    def _copy(self, source: int, target: int) -> bool:
        """Split: copy a sequence's cells into another stream (what it held goes first)."""
        assert self._ctx is not None
        state = seq_state(self._ctx.ctx, source)
        return bool(state) and load_seq_state(self._ctx.ctx, state, target)

    def _compact(self, memory: llama_cpp.llama_memory_t) -> None:
        """Split: move running sequences down to the lowest free streams until they hold ids
        0..n-1, so a step is one micro-batch (a gap costs another pass over the weights).
        What the target stream held is set aside first."""
        while self._running and self._free:
            top = max(self._running, key=lambda s: s.seq_id)
            low = min(self._free)
            if low > top.seq_id:
                return
            held = self._cache.pop(low, None)
            if held:
                self._set_aside(low, held)
            if not self._copy(top.seq_id, low):
                llama_cpp.llama_memory_seq_rm(memory, low, -1, -1)
                log.warning("model %s: a sequence could not be moved", self.config.id)
                return  # the gap costs speed only
            llama_cpp.llama_memory_seq_rm(memory, top.seq_id, -1, -1)
            self._free.remove(low)
            self._free.append(top.seq_id)
            top.seq_id = low
            self.moves += 1

    def _restore(
        self, seq: Sequence, saved: Saved, reuse: int, memory: llama_cpp.llama_memory_t
    ) -> bool:
        """Copy a sequence saved in host memory into cells of the job's own, its tail past the
        shared ``reuse`` tokens removed; cached sequences make room (the running ones always
        fit). False when it cannot be placed: the job goes on without it."""
        assert self._ctx is not None
        seq_id = self._free.pop()
        while not self.host.restore(self._ctx.ctx, saved, seq_id):
            if not self._cache:
                self._free.append(seq_id)
                return False
            self._drop(next(iter(self._cache)), memory, save=True)
        llama_cpp.llama_memory_seq_rm(memory, seq_id, reuse, -1)
        if reuse == len(saved.tokens):
            self.host.discard(saved)  # the job's cells hold all of it, and will hold more
        seq.seq_id = seq_id
        log.debug("job %s: %d tokens copied back from host memory", seq.job.id, reuse)
        return True

    def _step(self, ctx: LlamaContext, batch: llama_cpp.llama_batch, capacity: int) -> None:
        """One llama_decode over every running sequence, then one sample each."""
        outputs, added = self._fill(batch, capacity)
        interval_s = self.config.stream_interval_s * len(self._running)
        long_step = batch.n_tokens > len(outputs)  # prompt chunks: send what is held first
        for seq in self._running:
            seq.stream.interval_s = interval_s
            if long_step:
                seq.stream.flush()
        while (rc := llama_cpp.llama_decode(ctx.ctx, batch)) == 1 and self._cache:
            self._drop(next(iter(self._cache)), ctx.memory, save=True)  # least recently used
        if rc != 0:
            self._fail(added, ctx.memory, f"llama_decode returned {rc}")
            return
        self.steps += 1
        self.tokens += batch.n_tokens
        if self._split:
            ids = [seq.seq_id for seq, _ in added]
            self.gapped += max(ids) - min(ids) + 1 != len(ids)
        for seq, tokens in added:
            seq.cells.extend(tokens)
            if seq.next is not None:  # a decoding sequence (it has no pending tokens)
                seq.next = None
            else:
                del seq.pending[: len(tokens)]
        for seq, idx in outputs:
            if seq.signals.is_set():
                seq.gen.cancel()
            else:
                try:
                    seq.next = seq.gen.sample(ctx.ctx, idx)
                except Exception as e:  # this job's failure only
                    self._fail([(seq, [])], ctx.memory, f"sampling failed ({type(e).__name__})")
                    continue
            if seq.gen.reason is not None:
                self._end(seq, ctx.memory)

    def _fill(
        self, batch: llama_cpp.llama_batch, capacity: int
    ) -> tuple[list[tuple[Sequence, int]], list[tuple[Sequence, list[int]]]]:
        """Put the step's tokens into ``batch``: every decoding sequence's next token first,
        then prompt chunks in the room left. Returns the (sequence, batch index) pairs whose
        logits come out, and the tokens each sequence adds."""
        n = 0
        outputs: list[tuple[Sequence, int]] = []
        added: list[tuple[Sequence, list[int]]] = []

        def put(seq: Sequence, tokens: list[int], last_out: bool) -> None:
            nonlocal n
            pos = len(seq.cells)
            for j, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = pos + j  # type: ignore[call-overload]  # llama_pos per token
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq.seq_id
                batch.logits[n] = False
                n += 1
            if last_out:
                batch.logits[n - 1] = True
                outputs.append((seq, n - 1))
            added.append((seq, tokens))

        room = capacity - sum(seq.next is not None for seq in self._running)
        chunks: dict[int, list[int]] = {}
        for seq in self._running:  # in the order they came: the oldest prompt first
            if seq.pending and room > 0:
                chunks[seq.seq_id] = seq.pending[:room]
                room -= len(chunks[seq.seq_id])
        # By sequence id: llama.cpp cuts a split cache's batch at every break in the ids.
        for seq in sorted(self._running, key=lambda s: s.seq_id):
            if seq.next is not None:
                put(seq, [seq.next], True)
            elif seq.seq_id in chunks:
                chunk = chunks[seq.seq_id]
                put(seq, chunk, len(chunk) == len(seq.pending))
        batch.n_tokens = n
        return outputs, added

    def _fail(
        self, added: list[tuple[Sequence, list[int]]], memory: llama_cpp.llama_memory_t, why: str
    ) -> None:
        """End these sequences with a retryable error; their cells are freed, not cached."""
        log.error("model %s: %s", self.config.id, why)
        for seq, _ in added:
            if seq in self._running:
                self._running.remove(seq)
                llama_cpp.llama_memory_seq_rm(memory, seq.seq_id, -1, -1)
                self._free.append(seq.seq_id)
                seq.gen.sampler.close()
                seq.stream.fail(Retry(f"the text engine failed: {why}"))

    def _end(self, seq: Sequence, memory: llama_cpp.llama_memory_t) -> None:
        """The sequence has its ``Done``: hand it over; its cells go to the cache or are freed."""
        if seq in self._waiting:
            self._waiting.remove(seq)
        else:
            self._running.remove(seq)
            self._keep(seq, memory)
        seq.stream.finish(with_queue_ms(seq.gen.done(), seq.waited_ms))

    def _keep(self, seq: Sequence, memory: llama_cpp.llama_memory_t) -> None:
        """Cache a finished sequence's cells (if it allows and the cache has room), else free."""
        limit = self.config.cached()
        if not (seq.gen.cache_prompt and limit and seq.cells):
            llama_cpp.llama_memory_seq_rm(memory, seq.seq_id, -1, -1)
            self._free.append(seq.seq_id)
            return
        if self._split:  # its stream keeps them until a job takes the stream
            self._cache[seq.seq_id] = seq.cells
            self._free.append(seq.seq_id)
            return
        for sid, tokens in list(self._cache.items()):  # now redundant: a prefix of this one
            if len(tokens) <= len(seq.cells) and seq.cells[: len(tokens)] == tokens:
                self._drop(sid, memory)
        self._cache[seq.seq_id] = seq.cells
        while len(self._cache) > limit:
            self._drop(next(iter(self._cache)), memory, save=True)

    def _drop(self, sid: int, memory: llama_cpp.llama_memory_t, save: bool = False) -> None:
        """Forget a cached sequence: cells no other sequence shares become free; with
        ``save``, copied out to host memory first."""
        tokens = self._cache.pop(sid)
        if save and self._ctx is not None:
            self.host.save(self._ctx.ctx, sid, tokens)
        llama_cpp.llama_memory_seq_rm(memory, sid, -1, -1)
        if not self._split:  # a free stream's id is in ``_free`` already
            self._free.append(sid)
