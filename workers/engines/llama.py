"""The llama.cpp text engine: GGUF models through llama-cpp-python, tokens streamed as they come.

Batching: each model is loaded once, with one llama.cpp context whose KV cache holds
every slot's sequence, and one scheduler thread (``batch.Batcher``) that decodes the
next token of every running job in one ``llama_decode`` per step, with chunks of new
prompts in the room left. A job joins at the next step and leaves when it ends; it
reuses the longest cached prefix of its tokens (``cache_prompt``, on by default).

Thread model: a llama.cpp context is not thread safe, and one thread ever drives each
context: the scheduler thread loads it and runs every step on it, off the event loop.
One thread per context is not only tidiness: llama.cpp's CPU backend uses OpenMP, and
once a second thread has driven its compute in a process, libgomp's idle workers contend
for the cores (measured: decode at 70 instead of 144 tokens/s on 2 cores). With one
context per model (not per slot) a worker serving one model has one such thread.
Preparing a job (its chat template, tokens, grammar) runs on a short-lived thread beside
it: that only reads the vocabulary.

Streaming: the scheduler hands releasable pieces of text to the event loop through the
job's ``ThreadStream``, at most once per ``stream_interval_s`` x the sequences running
(the first at once); pieces handed over together, or queued up while the runtime is still
publishing the previous delta, are coalesced into one ``Delta``. Every hand-off wakes the
event loop, and every delta is a message the broker stores and the edge relays: on a small
CPU machine that work takes cores from llama.cpp's threads in the middle of a step
(``headrace.bench.llm_cpu`` measures it), so the worker's default interval (40 ms) sends a
few tokens per delta instead of one.

Embeddings (``embed.py``): a second, embedding-mode context on the same weights,
evaluated on the scheduler thread between two steps (``Batcher.call``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from schemas.errors import InvalidRequest
from schemas.events import Done, EngineEvent
from schemas.fleet import ModelInfo
from schemas.jobs import EmbedJob, TextJob
from schemas.subjects import JobKind
from workers.engines import batch, llama_rpc
from workers.engines.base import by_id, loaded_model
from workers.engines.decode import Generation, Piece, Signals, merge
from workers.engines.embed import Embedders
from workers.engines.gguf import GgufModel, ModelConfig, route_native_logs
from workers.engines.thread_stream import ThreadStream
from workers.queue_time import queue_ms, with_queue_ms

log = logging.getLogger(__name__)


class LlamaEngine:
    """A ``TextEngine`` serving GGUF models with llama.cpp; it ``AnswersRpc`` and ``Embeds``."""

    kind: JobKind = "llm"

    def __init__(self, configs: Sequence[ModelConfig]) -> None:
        self.configs = by_id(configs, "llama")
        self._models: dict[str, GgufModel] = {}
        self._batchers: dict[str, batch.Batcher] = {}
        self._embedders = Embedders()

    def models(self) -> list[ModelInfo]:
        """The configured models; their context length is the loaded n_ctx (per sequence)."""
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

    def model(self, model_id: str) -> GgufModel:
        """A loaded model (its weights hand out ``llama_model`` for other contexts)."""
        return self._model(model_id)[1]

    def batcher(self, model_id: str) -> batch.Batcher:
        """The scheduler of a loaded model (its ``steps`` and ``tokens`` count its work)."""
        return self._batchers[self._model(model_id)[0]]

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
            "loading %s from %s: %d sequence(s) of %s tokens in one context, "
            "%d/%d thread(s) (generation/prompt), %d GPU layer(s), %d cached prefix(es) ...",
            c.id,
            c.path.name,
            c.contexts,
            c.n_ctx or "the trained",
            c.threads(),
            c.threads_batch(),
            c.n_gpu_layers,
            c.cached(),
        )
        started = time.perf_counter()
        batcher = batch.Batcher(c)
        self._batchers[c.id] = batcher  # closed by close() even if loading fails
        self._models[c.id] = await batcher.start()
        await self._embedders.open(c, self._models[c.id], batcher.call)
        elapsed = time.perf_counter() - started
        log.info("loaded %s in %.2f s (n_ctx %d)", c.id, elapsed, self._models[c.id].n_ctx)

    async def close(self) -> None:
        """End running generations (within a token), then free every model; start() may reload."""
        # Before the weights their contexts use; waits out an evaluation in progress, off the loop.
        await asyncio.to_thread(self._embedders.close)
        for batcher in self._batchers.values():
            await batcher.close()
        self._models.clear()
        self._batchers.clear()

    def _model(self, model_id: str) -> tuple[str, GgufModel]:
        """The loaded model a job or request names (by id, or by the id's subject slug)."""
        return loaded_model(self._models, model_id)

    async def rpc(self, model: str, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        """tokenize, detokenize, apply-template or props (off the loop: tokenizing can be long)."""
        _, loaded = self._model(model)
        return await asyncio.to_thread(llama_rpc.answer, loaded, op, payload)

    async def run(self, job: TextJob, cancel: threading.Event) -> AsyncGenerator[EngineEvent, None]:
        """Join the model's batch; yield coalesced deltas, then done."""
        model_id, model = self._model(job.model)
        if model.config.embedding_only:
            raise InvalidRequest(f"{model_id} computes embeddings only", param="model")
        batcher = self._batchers[model_id]
        stream: ThreadStream[Piece, Done] = ThreadStream(model.config.stream_interval_s)
        signals = Signals(cancel)
        gen = await asyncio.to_thread(Generation, model, job, stream.send)
        if gen.reason is None:
            try:
                batcher.submit(batch.Sequence(job, gen, signals, stream))
            except BaseException:
                gen.sampler.close()
                raise
        else:  # a continuation whose first attempt had ended its text: nothing to evaluate
            stream.finish(with_queue_ms(gen.done(), queue_ms(job)))
        try:
            # One delta per batch: the pieces that queued up meanwhile, coalesced.
            async with contextlib.aclosing(stream.batches()) as batches:
                async for pieces in batches:
                    yield merge(pieces)
            yield stream.result
        finally:
            signals.abort.set()  # the runtime stopped listening (or we are done): drop the job

    async def embed(
        self, job: EmbedJob, cancel: threading.Event
    ) -> AsyncGenerator[EngineEvent, None]:
        """An embedding job on the model's embedding context (``embed.py``), evaluated on the
        model's scheduler thread between two steps of its text batch: only that thread
        drives llama.cpp's compute."""
        model_id, _ = self._model(job.model)
        self._embedders.get(model_id)  # refused before anything runs
        waited_ms = queue_ms(job)
        events = self._embedders.run(model_id, job, cancel, self._batchers[model_id].call)
        async with contextlib.aclosing(events) as running:
            async for event in running:
                yield with_queue_ms(event, waited_ms) if isinstance(event, Done) else event
