"""The echo engine: deterministic pseudo-tokens, for tests and for measuring the pipeline itself.

It does no inference. Its tokens are drawn from the prompt's words with a
generator seeded by the job's seed, so the same job gives the same text on any
worker, and its per-token delay stands in for a model's decode time. Its
embeddings are pseudo-random vectors seeded by each input (the same input gives
the same vector, alone or in a batch), normalized as the llama.cpp engine's are.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import threading
import time
from collections.abc import AsyncGenerator
from typing import Any

from schemas.errors import ContextLengthExceeded, InvalidRequest
from schemas.events import Delta, Done, Embeddings, EngineEvent, FinishReason, Timings, Usage
from schemas.fleet import ModelInfo
from schemas.jobs import EmbedJob, TextJob
from schemas.subjects import JobKind
from schemas.vectors import encode_vector
from workers.engines.vectors import normalize

_FILLER = ("lorem", "ipsum", "dolor", "sit", "amet", "headrace", "stream", "token")


def prompt_text(job: TextJob) -> str:
    """The job's prompt as plain text (chat messages joined)."""
    p = job.params
    if p.messages is not None:
        return "\n".join(f"{m.role}: {m.content}" for m in p.messages)
    if isinstance(p.prompt, list):
        return " ".join(str(t) for t in p.prompt)
    return p.prompt or ""


def _stop_in(text: str, stops: list[str]) -> str | None:
    """The first stop string found in the text (the echo engine sends it, then stops)."""
    return next((s for s in stops if s and s in text), None)


class EchoEngine:
    """A ``TextEngine`` that needs no model; it ``AnswersRpc`` (tokenize and props only)."""

    kind: JobKind = "llm"

    def __init__(
        self,
        model: str = "echo",
        *,
        token_delay_s: float = 0.0,
        default_tokens: int = 16,
        context_length: int = 4096,
        embedding_dims: int = 64,
    ) -> None:
        self.model = model
        self.embedding_dims = embedding_dims
        self.token_delay_s = token_delay_s
        self.default_tokens = default_tokens
        self.context_length = context_length

    def models(self) -> list[ModelInfo]:
        """The one model id this engine answers to."""
        return [
            ModelInfo(
                id=self.model, kind="llm", context_length=self.context_length, embeddings=True
            )
        ]

    async def start(self) -> None:
        """Nothing to load."""

    async def close(self) -> None:
        """Nothing to release."""

    async def rpc(self, model: str, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Whitespace tokenization, so clients of the rpc subjects can be tested."""
        if op == "tokenize":
            return {"tokens": [len(w) for w in str(payload.get("content", "")).split()]}
        if op == "props":
            return {"model": self.model, "n_ctx": self.context_length}
        raise InvalidRequest(f"the echo engine does not support {op!r}")

    def _words(self, job: TextJob) -> tuple[list[str], random.Random]:
        text = prompt_text(job)
        digest = hashlib.blake2b(f"{job.params.seed}:{text}".encode(), digest_size=8).digest()
        words = text.split() or list(_FILLER)
        return words, random.Random(int.from_bytes(digest, "big"))

    async def run(self, job: TextJob, cancel: threading.Event) -> AsyncGenerator[EngineEvent, None]:
        """Emit max_tokens (or the default count of) pseudo-tokens, one per delta.

        A token's id is its word's index in the prompt. A continuation draws the
        delivered tokens again without sending them, so it goes on exactly as the
        interrupted run would have.
        """
        started = time.perf_counter()
        words, rng = self._words(job)
        prompt_tokens = len(words)
        limit = job.params.max_tokens or self.default_tokens
        text, n = "", 0
        reason: FinishReason = "length" if job.params.max_tokens else "stop"
        for _ in job.resume.token_ids if job.resume else ():
            text += words[rng.randrange(len(words))] + " "
            n += 1
        word = _stop_in(text, job.params.stop)
        if word is not None:
            reason = "stop"
        while n < limit and word is None:
            if cancel.is_set():
                reason = "cancelled"
                break
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)
            index = rng.randrange(len(words))
            piece = words[index] + " "
            n += 1
            text += piece
            yield Delta(text=piece, tokens=1, token_ids=[index])
            word = _stop_in(text, job.params.stop)
            if word is not None:
                reason = "stop"
                break
        elapsed_ms = (time.perf_counter() - started) * 1000
        yield Done(
            finish_reason=reason,
            usage=Usage(
                prompt_tokens=prompt_tokens, completion_tokens=n, total_tokens=prompt_tokens + n
            ),
            timings=Timings(prompt_n=prompt_tokens, predicted_n=n, predicted_ms=elapsed_ms),
            seed=job.params.seed,
            stop_word=word,
        )

    def _vector(self, item: str | list[int], i: int, job: EmbedJob) -> tuple[str, int]:
        """One input's pseudo-embedding (base64 float32) and its token count (its words)."""
        words = item.split() if isinstance(item, str) else [str(t) for t in item]
        if not words:
            raise InvalidRequest(f"input {i} is empty", param="input")
        if len(words) > self.context_length:
            if not job.params.truncate:
                raise ContextLengthExceeded(
                    f"input {i} is {len(words)} tokens but the context of {self.model} "
                    f"holds {self.context_length}",
                    param="input",
                )
            words = words[: self.context_length]
        text = " ".join(words)
        digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
        rng = random.Random(int.from_bytes(digest, "big"))
        raw = [rng.gauss(0.0, 1.0) for _ in range(self.embedding_dims)]
        return encode_vector(normalize(raw, job.params.normalize)), len(words)

    async def embed(
        self, job: EmbedJob, cancel: threading.Event
    ) -> AsyncGenerator[EngineEvent, None]:
        """Every input's pseudo-embedding in one event, then done with the word count."""
        dims = job.params.dimensions
        if dims is not None and dims != self.embedding_dims:
            raise InvalidRequest(
                f"{self.model} makes vectors of {self.embedding_dims} dimensions",
                param="dimensions",
            )
        if self.token_delay_s:
            await asyncio.sleep(self.token_delay_s)
        if cancel.is_set():
            yield Done(finish_reason="cancelled")
            return
        made = [self._vector(item, i, job) for i, item in enumerate(job.params.inputs)]
        n = sum(tokens for _, tokens in made)
        yield Embeddings(index=0, dims=self.embedding_dims, vectors=[v for v, _ in made])
        yield Done(
            finish_reason="stop",
            usage=Usage(prompt_tokens=n, total_tokens=n),
            timings=Timings(prompt_n=n),
        )
