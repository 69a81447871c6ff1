"""Embeddings of a loaded GGUF model: a second llama.cpp context on the same weights.

``llama_init_from_model`` makes a context in embedding mode from the ``llama_model`` the
text contexts already hold, so embeddings cost one more KV cache and compute buffer, not
another copy of the weights (on a GPU, no second upload). Pooling is the model's own
(``<arch>.pooling_type`` in the GGUF, as llama.cpp's server reads it), mean when the
model names none: a causal chat model such as SmolLM2 names none.

All the inputs of one job are evaluated together: as many as fit go into one
``llama_batch``, each its own sequence (seq_id 0, 1, ...), and one ``llama_decode``
gives every sequence's pooled vector (``llama_get_embeddings_seq``). The context is
unified (``kv_unified``) so one long input may use all of it, and its micro-batch is the
whole batch: llama.cpp pools per micro-batch, so a sequence split across two would be
pooled wrong. Vectors are normalized as llama.cpp's ``common_embd_normalize`` does
(``EmbedParams.normalize`` is its ``embd_normalize``) and travel as base64 float32.

The context is not thread safe: one job evaluates on it at a time (``Embedder.lock``),
on the model's scheduler thread between two steps of the text batch (``Batcher.call``,
see ``LlamaEngine.embed``): only that thread ever drives llama.cpp's compute.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

import llama_cpp

from schemas.errors import ContextLengthExceeded, EngineError, InvalidRequest
from schemas.events import Done, Embeddings, EngineEvent, Timings, Usage
from schemas.jobs import EmbedJob
from schemas.vectors import encode_vector
from workers.engines.gguf import GgufModel, ModelConfig, flash_attn_type
from workers.engines.vectors import normalize

log = logging.getLogger(__name__)

MAX_SEQUENCES = 64  # inputs in one evaluated batch (llama.cpp allows up to 256 sequences)
# The most tokens of one input (and one batch): the micro-batch is all of it, and its compute
# buffers grow with it (a model trained on 128k tokens would otherwise ask for 128k).
MAX_TOKENS = 8192
EVENT_BYTES = 512 * 1024  # vector bytes per Embeddings event: well under a NATS message

POOLING = {
    "mean": llama_cpp.LLAMA_POOLING_TYPE_MEAN,
    "cls": llama_cpp.LLAMA_POOLING_TYPE_CLS,
    "last": llama_cpp.LLAMA_POOLING_TYPE_LAST,
}
_NAMES = {v: k for k, v in POOLING.items()}


def model_pooling(metadata: dict[str, str], configured: str | None = None) -> int:
    """The pooling to use: the configured one, else the GGUF's, else mean.

    A model whose GGUF says ``none`` (one vector per token) or ``rank`` (a reranker's
    score) has no one vector per input to offer; it is pooled by mean unless configured.
    """
    if configured is not None:
        return POOLING[configured]
    arch = metadata.get("general.architecture", "")
    raw = metadata.get(f"{arch}.pooling_type")
    try:
        declared = int(raw) if raw is not None else llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED
    except ValueError:
        declared = llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED
    return declared if declared in _NAMES else llama_cpp.LLAMA_POOLING_TYPE_MEAN


def pack(lengths: Sequence[int], start: int, n_batch: int) -> int:
    """The end of the batch that starts at input ``start``: as many inputs as fit in
    ``n_batch`` tokens and ``MAX_SEQUENCES`` sequences (always at least one)."""
    end, used = start, 0
    while end < len(lengths) and end - start < MAX_SEQUENCES:
        if end > start and used + lengths[end] > n_batch:
            break
        used += lengths[end]
        end += 1
    return end


class Embedder:
    """An embedding-mode llama.cpp context on a loaded model's weights."""

    def __init__(self, model: GgufModel, config: ModelConfig) -> None:
        self.model = model
        llama_model = model.llama_model
        self.pooling = model_pooling(model.weights.metadata(), config.pooling)
        trained = model.n_ctx_train
        wanted = min(config.n_ctx or trained or MAX_TOKENS, MAX_TOKENS)
        self.n_ctx = min(wanted, trained) if trained > 0 else wanted
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = self.n_ctx
        params.n_seq_max = MAX_SEQUENCES
        params.kv_unified = True
        params.embeddings = True
        params.pooling_type = self.pooling
        # As the text context: flash attention as configured (llama.cpp decides by default).
        params.flash_attn_type = flash_attn_type(config)
        params.n_threads = config.threads()
        params.n_threads_batch = config.threads_batch()
        self.ctx = llama_cpp.llama_init_from_model(llama_model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not make an embedding context for {config.id}")
        # What one input (and one batch) may hold: llama.cpp pads the context (to 256
        # cells) but not the batch, and a batch past n_batch aborts the process.
        self.n_ctx = min(
            int(llama_cpp.llama_n_ctx(self.ctx)),
            int(llama_cpp.llama_n_batch(self.ctx)),
            int(llama_cpp.llama_n_ubatch(self.ctx)),
        )
        self.n_embd = int(llama_cpp.llama_model_n_embd_out(llama_model))
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(self.n_ctx, 0, 1)
        self.lock = threading.Lock()
        self._closed = False

    @property
    def pooling_name(self) -> str:
        """mean, cls or last."""
        return _NAMES[self.pooling]

    def close(self) -> None:
        """Free the context (after any evaluation in progress); a second call does nothing."""
        with self.lock:
            if self._closed:
                return
            self._closed = True
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ctx)

    def tokens(self, job: EmbedJob) -> list[list[int]]:
        """Every input as token ids, checked against the vocabulary and the context."""
        p = job.params
        if p.dimensions is not None and p.dimensions != self.n_embd:
            raise InvalidRequest(
                f"{self.model.config.id} makes vectors of {self.n_embd} dimensions; "
                f"dimensions {p.dimensions} is not supported",
                param="dimensions",
            )
        out: list[list[int]] = []
        for i, item in enumerate(p.inputs):
            if isinstance(item, str):
                tokens = self.model.tokenize(item, add_special=True)
            else:
                tokens = list(item)
                bad = next((t for t in tokens if not 0 <= t < self.model.n_vocab), None)
                if bad is not None:
                    raise InvalidRequest(
                        f"input {i}: token {bad} is outside the vocabulary "
                        f"(0..{self.model.n_vocab - 1})",
                        param="input",
                    )
            out.append(self._fit(tokens, i, p.truncate))
        return out

    def _fit(self, tokens: list[int], i: int, truncate: bool) -> list[int]:
        if not tokens:
            raise InvalidRequest(f"input {i} is empty", param="input")
        if len(tokens) <= self.n_ctx:
            return tokens
        if truncate:
            return tokens[: self.n_ctx]
        raise ContextLengthExceeded(
            f"input {i} is {len(tokens)} tokens but the context of "
            f"{self.model.config.id} holds {self.n_ctx}",
            param="input",
        )

    def evaluate(self, inputs: Sequence[Sequence[int]], norm: int) -> list[str]:
        """One ``llama_decode`` of ``inputs`` (they fit one batch); their vectors in base64."""
        with self.lock:
            if self._closed:
                raise EngineError("the model was unloaded")
            if sum(len(t) for t in inputs) > self.n_ctx:  # pack() keeps to it; llama.cpp aborts
                raise EngineError(f"a batch of embeddings exceeds {self.n_ctx} tokens")
            if self.memory is not None:
                llama_cpp.llama_memory_clear(self.memory, True)
            self._fill(inputs)
            rc = llama_cpp.llama_decode(self.ctx, self.batch)
            if rc != 0:
                raise EngineError(f"llama_decode failed ({rc}) computing embeddings")
            vectors = []
            for seq in range(len(inputs)):
                ptr = llama_cpp.llama_get_embeddings_seq(self.ctx, seq)
                if not ptr:
                    raise EngineError("llama.cpp returned no pooled embedding")
                vectors.append(encode_vector(normalize(ptr[: self.n_embd], norm)))
            return vectors

    def _fill(self, inputs: Sequence[Sequence[int]]) -> None:
        b = self.batch
        n = 0
        for seq, tokens in enumerate(inputs):
            for pos, token in enumerate(tokens):
                b.token[n] = token
                b.pos[n] = pos
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = seq
                b.logits[n] = True  # in embedding mode every token is an output
                n += 1
        b.n_tokens = n


class Embedders:
    """The embedders of an engine's models, by model id, and what a job does with one."""

    def __init__(self) -> None:
        self._by_model: dict[str, Embedder] = {}

    def info(self, config: ModelConfig) -> dict[str, Any]:
        """What ``ModelInfo`` says about a model's embeddings."""
        embedder = self._by_model.get(config.id)
        out: dict[str, Any] = {"embeddings": embedder is not None}
        if config.embedding_only:
            out["embedding_only"] = True
            if embedder is not None:
                out["context_length"] = embedder.n_ctx
        return out

    async def open(
        self,
        config: ModelConfig,
        model: GgufModel,
        on_thread: Callable[[Callable[[], Any]], asyncio.Future[Any]],
    ) -> None:
        """Make a model's embedding context (through ``on_thread``: the model's scheduler
        thread), when the model serves embeddings."""
        if not (config.embeddings or config.embedding_only):
            return
        try:
            embedder: Embedder = await on_thread(functools.partial(Embedder, model, config))
        except RuntimeError:
            if config.embedding_only:
                raise
            log.warning("%s: no embedding context could be made; it serves text only", config.id)
            return
        self._by_model[config.id] = embedder
        log.info(
            "%s computes embeddings: %d dimensions, %s pooling, inputs up to %d tokens",
            config.id,
            embedder.n_embd,
            embedder.pooling_name,
            embedder.n_ctx,
        )

    def close(self) -> None:
        """Free every embedding context (before the models they use are freed)."""
        for embedder in self._by_model.values():
            embedder.close()
        self._by_model.clear()

    def get(self, model_id: str) -> Embedder:
        """The model's embedder; InvalidRequest when it computes no embeddings."""
        embedder = self._by_model.get(model_id)
        if embedder is None:
            raise InvalidRequest(f"{model_id} does not compute embeddings here", param="model")
        return embedder

    async def run(
        self,
        model_id: str,
        job: EmbedJob,
        cancel: threading.Event,
        on_thread: Callable[[Callable[[], Any]], asyncio.Future[Any]],
    ) -> AsyncGenerator[EngineEvent, None]:
        """The job's vectors, a batch at a time, then ``done`` with the prompt tokens.

        ``on_thread`` runs a blocking call where llama.cpp may compute (the model's
        scheduler thread, between two steps of its text batch). Cancelled between batches.
        """
        embedder = self.get(model_id)
        started = time.perf_counter()
        tokens: list[list[int]] = await on_thread(functools.partial(embedder.tokens, job))
        norm = job.params.normalize
        lengths = [len(t) for t in tokens]
        pending: list[str] = []
        first = start = 0
        per_event = max(1, EVENT_BYTES // (4 * embedder.n_embd))
        while start < len(tokens):
            if cancel.is_set():
                yield Done(finish_reason="cancelled")
                return
            end = pack(lengths, start, embedder.n_ctx)
            chunk = tokens[start:end]
            pending += await on_thread(functools.partial(embedder.evaluate, chunk, norm))
            start = end
            while len(pending) >= per_event or (pending and start == len(tokens)):
                sent, pending = pending[:per_event], pending[per_event:]
                yield Embeddings(index=first, dims=embedder.n_embd, vectors=sent)
                first += len(sent)
        n = sum(lengths)
        elapsed_ms = (time.perf_counter() - started) * 1000
        yield Done(
            finish_reason="stop",
            usage=Usage(prompt_tokens=n, total_tokens=n),
            timings=Timings(prompt_n=n, prompt_ms=elapsed_ms),
        )
