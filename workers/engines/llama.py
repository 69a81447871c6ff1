"""The llama.cpp text engine: GGUF models through llama-cpp-python, tokens streamed as they come.

Thread model: a llama.cpp context is not thread safe, so each model is loaded
once per slot (``ModelConfig.contexts``), and a job borrows one context for its
whole run. Every context has one thread of its own, for its whole life: it is
loaded there and every job on it generates there, off the event loop. One
thread per context is not only tidiness: llama.cpp's CPU backend uses OpenMP,
and once a second thread has driven its compute in a process, libgomp's idle
workers contend for the cores (measured: decode at 70 instead of 144 tokens/s
on 2 cores). With mmap the contexts share the weights' file pages; each has
its own KV cache.

Streaming: the thread hands every releasable piece of text to the event loop
through a ``ThreadStream``; pieces that queue up while the runtime is still
publishing the previous delta are coalesced into one ``Delta``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncGenerator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import llama_cpp

from schemas.errors import InvalidRequest
from schemas.events import Done, EngineEvent
from schemas.fleet import ModelInfo
from schemas.jobs import EmbedJob, TextJob
from schemas.subjects import JobKind
from workers.engines import llama_rpc
from workers.engines.base import by_id, loaded_model
from workers.engines.decode import Piece, Signals, generate, merge
from workers.engines.embed import Embedders
from workers.engines.gguf import GgufModel, ModelConfig, load_context, route_native_logs
from workers.engines.thread_stream import ThreadStream
from workers.queue_time import queue_ms, with_queue_ms

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Slot:
    """One llama.cpp context and the one thread that ever touches it."""

    llm: llama_cpp.Llama
    thread: ThreadPoolExecutor


class LlamaEngine:
    """A ``TextEngine`` serving GGUF models with llama.cpp; it ``AnswersRpc`` and ``Embeds``."""

    kind: JobKind = "llm"

    def __init__(self, configs: Sequence[ModelConfig]) -> None:
        self.configs = by_id(configs, "llama")
        self._models: dict[str, GgufModel] = {}
        self._slots: list[_Slot] = []
        self._free: dict[str, asyncio.Queue[_Slot]] = {}
        self._jobs: dict[asyncio.Future[None], Signals] = {}
        self._embedders = Embedders()

    def models(self) -> list[ModelInfo]:
        """The configured models; their context length is the loaded n_ctx."""
        return [
            ModelInfo.model_validate(
                {
                    "id": c.id,
                    "kind": "llm",
                    "context_length": self._models[c.id].n_ctx if c.id in self._models else c.n_ctx,
                    **self._embedders.info(c),
                }
            )
            for c in self.configs.values()
        ]

    async def start(self) -> None:
        """Load every model, logging progress; a second call does nothing."""
        if self._models:
            return
        route_native_logs()
        try:
            for c in self.configs.values():
                await self._load(c)
        except BaseException:
            await self.close()
            raise

    async def _load(self, c: ModelConfig) -> None:
        log.info(
            "loading %s from %s: %d context(s) of %s tokens, %d/%d thread(s) each "
            "(generation/prompt), %d GPU layer(s) ...",
            c.id,
            c.path.name,
            c.contexts,
            c.n_ctx or "the trained",
            c.threads(),
            c.threads_batch(),
            c.n_gpu_layers,
        )
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        slots: list[_Slot] = []
        for i in range(c.contexts):
            thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{c.id}-{i}")
            try:
                llm = await loop.run_in_executor(thread, load_context, c)
            except BaseException:
                thread.shutdown(wait=False)
                raise
            slots.append(_Slot(llm, thread))
            self._slots.append(slots[-1])
        self._models[c.id] = GgufModel(c, [s.llm for s in slots])
        await self._embedders.open(c, self._models[c.id], slots[0].thread)
        free: asyncio.Queue[_Slot] = asyncio.Queue()
        for slot in slots:
            free.put_nowait(slot)
        self._free[c.id] = free
        elapsed = time.perf_counter() - started
        log.info("loaded %s in %.2f s (n_ctx %d)", c.id, elapsed, self._models[c.id].n_ctx)

    async def close(self) -> None:
        """Stop running generations (within a token), then free every model; start() may reload."""
        for signals in self._jobs.values():
            signals.abort.set()
        if self._jobs:
            await asyncio.gather(*self._jobs, return_exceptions=True)
        # Before the models their contexts use; waits out a batch in progress, off the loop.
        await asyncio.to_thread(self._embedders.close)
        for slot in self._slots:  # also the contexts of a model whose loading failed half way
            slot.llm.close()
            slot.thread.shutdown(wait=True)
        self._models.clear()
        self._slots.clear()
        self._free.clear()

    def _model(self, model_id: str) -> tuple[str, GgufModel]:
        """The loaded model a job or request names (by id, or by the id's subject slug)."""
        return loaded_model(self._models, model_id)

    async def rpc(self, model: str, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        """tokenize, detokenize, apply-template or props (off the loop: tokenizing can be long)."""
        _, loaded = self._model(model)
        return await asyncio.to_thread(llama_rpc.answer, loaded, op, payload)

    async def run(self, job: TextJob, cancel: threading.Event) -> AsyncGenerator[EngineEvent, None]:
        """Generate on a borrowed context's thread; yield coalesced deltas, then done."""
        model_id, model = self._model(job.model)
        if model.config.embedding_only:
            raise InvalidRequest(f"{model_id} computes embeddings only", param="model")
        free = self._free[model_id]
        slot = await free.get()
        waited_ms = queue_ms(job)  # once the context is ours: waiting for one is queueing too
        loop = asyncio.get_running_loop()
        stream: ThreadStream[Piece, Done] = ThreadStream()
        signals = Signals(cancel)
        work = stream.work(lambda send: generate(model, slot.llm, job, signals, send))

        def release(future: asyncio.Future[None]) -> None:
            # The context goes back only when its thread is done with it, whatever the consumer did.
            self._jobs.pop(future, None)
            free.put_nowait(slot)

        future = loop.run_in_executor(slot.thread, work)
        self._jobs[future] = signals
        future.add_done_callback(release)
        try:
            # One delta per batch: the pieces that queued up meanwhile, coalesced.
            async with contextlib.aclosing(stream.batches()) as batches:
                async for pieces in batches:
                    yield merge(pieces)
            yield with_queue_ms(stream.result, waited_ms)
        finally:
            signals.abort.set()  # the runtime stopped listening (or we are done): stop the thread

    async def embed(
        self, job: EmbedJob, cancel: threading.Event
    ) -> AsyncGenerator[EngineEvent, None]:
        """An embedding job on the model's embedding context (``embed.py``), evaluated on the
        thread of a borrowed slot: only threads that already drive llama.cpp compute do."""
        model_id, _ = self._model(job.model)
        self._embedders.get(model_id)  # refused before waiting for a slot
        free = self._free[model_id]
        slot = await free.get()
        waited_ms = queue_ms(job)
        loop = asyncio.get_running_loop()
        try:
            events = self._embedders.run(
                model_id, job, cancel, lambda call: loop.run_in_executor(slot.thread, call)
            )
            async with contextlib.aclosing(events) as running:
                async for event in running:
                    yield with_queue_ms(event, waited_ms) if isinstance(event, Done) else event
        finally:
            free.put_nowait(slot)  # its thread runs calls in order: the next waits its turn
