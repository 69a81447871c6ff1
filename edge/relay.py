"""From job events to what a route writes: text per choice, a diffusion step, finish,
failure, or an idle tick.

Attempts are hidden below it: ``schemas.client.JobStream`` stitches a job's attempts
into one sequence (a continuation goes on from the text delivered, a restart's repeated
text and steps are dropped), so the relay passes every delta on as it comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from schemas.client import JobStream, Received
from schemas.events import Delta, Done, Embeddings, Error, Progress, Started, TokenLogprob

Tick = float | None
_JOIN_EVERY = 256  # deltas of a choice's text kept apart before they are joined into one str


@dataclass(slots=True)
class Text:
    """New text for choice ``index``; ``event_id`` is the SSE id of the event it came from."""

    index: int
    event_id: str
    text: str
    tokens: int
    logprobs: list[TokenLogprob] | None = None
    token_ids: list[int] | None = None  # from engines with a tokenizer


@dataclass(slots=True)
class Finished:
    """Choice ``index`` is done."""

    index: int
    event_id: str
    done: Done


@dataclass(slots=True)
class Failed:
    """Choice ``index`` failed; the request fails with it."""

    index: int
    event_id: str
    error: Error


@dataclass(slots=True)
class Stepped:
    """Choice ``index`` (an image job) finished a diffusion step."""

    index: int
    progress: Progress


@dataclass(slots=True)
class Idle:
    """Nothing arrived for a while: time for a keep-alive."""


Out = Text | Stepped | Finished | Failed | Idle


@dataclass
class Choice:
    """Where one choice's job stands."""

    index: int
    stream: JobStream
    finished: bool = False
    started: bool = False  # a worker took the job
    tokens: int = 0  # completion tokens passed on (what a job that never finishes is charged)
    done: Done | None = None
    first_text_at: float | None = None
    last_text_at: float | None = None
    queue_ms: float | None = None  # from the started event of the attempt that ran it
    region: str | None = None  # of the worker that started the latest attempt
    parts: list[str] = field(default_factory=list)  # the text passed on: "".join(parts)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # of the deltas passed on
    loose: int = 0  # parts at the end of ``parts`` not yet joined into one
    vectors: dict[int, str] = field(default_factory=dict)  # an embedding job's, by input

    def accept(self, received: Received) -> Out | None:
        """What this event means for the client, if anything."""
        event = received.event
        event_id = received.pos.event_id()
        if isinstance(event, Delta):
            return self._text(event, event_id)
        if isinstance(event, Done):
            self.finished, self.done = True, event
            return Finished(self.index, event_id, event)
        if isinstance(event, Error):
            self.finished = True
            return Failed(self.index, event_id, event)
        self.started = True
        if isinstance(event, Embeddings):  # kept by index: a redelivery sends the same again
            self.vectors.update(enumerate(event.vectors, event.index))
            return None
        if isinstance(event, Progress):
            return Stepped(self.index, event)
        if isinstance(event, Started):
            self.queue_ms = event.queue_ms
            self.region = event.region
        return None

    def _text(self, delta: Delta, event_id: str) -> Text | None:
        text = delta.text
        if not text:
            return None
        self.last_text_at = time.perf_counter()
        if self.first_text_at is None:
            self.first_text_at = self.last_text_at
        self.tokens += delta.tokens
        self.parts.append(text)
        self.loose += 1
        if self.loose == _JOIN_EVERY:
            # A delta is a token or a few: kept one str each, a 32 768-token answer costs
            # its length many times over (a str object is about 50 bytes), so join them.
            self.parts[-_JOIN_EVERY:] = ["".join(self.parts[-_JOIN_EVERY:])]
            self.loose = 0
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.token_ids:
            self.token_ids.extend(delta.token_ids)
        return Text(self.index, event_id, text, delta.tokens, delta.logprobs, delta.token_ids)


class Relay:
    """Interleaves the events of one request's jobs, with idle ticks for keep-alives."""

    def __init__(self, streams: list[JobStream], first_tick_s: float, tick_s: float) -> None:
        self.choices = [Choice(i, s) for i, s in enumerate(streams)]
        self.first_tick_s = first_tick_s
        self.tick_s = tick_s
        self._queue: asyncio.Queue[tuple[int, Received] | BaseException] = asyncio.Queue()
        self._readers: list[asyncio.Task[None]] = []

    @property
    def finished(self) -> bool:
        """True once every choice is done or failed."""
        return all(c.finished for c in self.choices)

    def __aiter__(self) -> AsyncIterator[Out]:
        return self._run()

    async def _run(self) -> AsyncIterator[Out]:
        if len(self.choices) > 1:
            self._readers = [asyncio.create_task(self._read(c)) for c in self.choices]
        tick = self.first_tick_s
        while not self.finished:
            got = await self._next(tick)
            if got is None:
                tick = self.tick_s
                yield Idle()
                continue
            index, received = got
            out = self.choices[index].accept(received)
            if out is not None:
                tick = self.tick_s
                yield out

    async def _next(self, timeout_s: float) -> tuple[int, Received] | None:
        if not self._readers:  # one choice: read its stream directly, no extra hop
            received = await self.choices[0].stream.next(timeout_s)
            return None if received is None else (0, received)
        try:
            async with asyncio.timeout(timeout_s):
                item = await self._queue.get()
        except TimeoutError:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    async def _read(self, choice: Choice) -> None:
        try:
            async for received in choice.stream:
                self._queue.put_nowait((choice.index, received))
        except Exception as e:  # DeadlineExceeded and friends surface in the iterating task
            self._queue.put_nowait(e)

    def tokens_used(self, prompt_estimate: int, late: dict[int, Done] | None = None) -> int:
        """Tokens used as ``usage`` reports them: the prompt once, every choice's completion.

        ``late`` holds the ``done`` of choices that finished after the relay stopped. A job
        that never reported usage is charged the completion tokens it sent, plus
        ``prompt_estimate`` once a worker took it.
        """
        prompt = completion = 0
        for ch in self.choices:
            done = ch.done or (late or {}).get(ch.index)
            if done is not None:
                prompt = max(prompt, done.usage.prompt_tokens)
                completion += done.usage.completion_tokens
                continue
            if ch.started or ch.tokens:
                prompt = max(prompt, prompt_estimate)
            completion += ch.tokens
        return prompt + completion

    async def close(self) -> list[str]:
        """Stop reading; returns the ids of the jobs that have not finished (the caller cancels)."""
        for task in self._readers:
            task.cancel()
        for c in self.choices:
            with contextlib.suppress(Exception):
                await c.stream.close()
        return [c.stream.job_id for c in self.choices if not c.finished]
