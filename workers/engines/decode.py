"""What one job does inside a batch: its sampler chain, its tokens, its output.

A ``Generation`` holds a job's prompt tokens, a chain built from its
``SamplerPlan`` and its output; the batch scheduler (``batch.py``) evaluates its
tokens among other sequences' and asks it for one sampled token per step. Each
releasable piece of text goes to ``emit`` (the engine coalesces them into deltas
on the event loop).
"""

from __future__ import annotations

import codecs
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import assert_never

import llama_cpp
import numpy as np
from llama_cpp._internals import LlamaSampler
from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

from schemas.errors import InvalidRequest
from schemas.events import Delta, Done, FinishReason, Timings, TokenLogprob, TopLogprob, Usage
from schemas.jobs import TextJob
from workers.engines.gguf import GgufModel
from workers.engines.sampling import (
    Dist,
    Grammar,
    Greedy,
    MinP,
    Mirostat,
    MirostatV2,
    SamplerPlan,
    Step,
    Temp,
    TopK,
    TopP,
    Typical,
    plan,
    token_budget,
)
from workers.engines.stops import StopHoldback


@dataclass(slots=True)
class Piece:
    """Text released by the loop, with the tokens it took (and their logprobs when asked)."""

    text: str
    tokens: int
    logprobs: list[TokenLogprob] | None = None
    token_ids: list[int] = field(default_factory=list)


def merge(pieces: Sequence[Piece]) -> Delta:
    """Coalesce pieces that queued up while the previous delta was being sent."""
    logprobs = [lp for p in pieces for lp in p.logprobs or ()] if pieces[0].logprobs else None
    return Delta(
        text="".join(p.text for p in pieces),
        tokens=sum(p.tokens for p in pieces),
        logprobs=logprobs,
        token_ids=[t for p in pieces for t in p.token_ids],
    )


@dataclass(slots=True)
class Signals:
    """Why a loop should stop early: the job's cancel, or the engine letting go of it."""

    cancel: threading.Event
    abort: threading.Event = field(default_factory=threading.Event)

    def is_set(self) -> bool:
        """True once either flag is up."""
        return self.cancel.is_set() or self.abort.is_set()


def grammar_text(g: Grammar) -> str:
    """GBNF for a grammar request (JSON Schemas through llama-cpp-python's converter)."""
    if g.kind == "gbnf":
        return g.source
    if g.kind == "json":
        return JSON_GBNF
    try:
        return LlamaGrammar.from_json_schema(g.source, verbose=False)._grammar
    except Exception as e:  # the converter raises bare Exceptions for what it does not support
        raise InvalidRequest(
            f"json_schema cannot be turned into a grammar ({type(e).__name__})",
            param="json_schema",
        ) from None


def add_step(sampler: LlamaSampler, step: Step, n_vocab: int) -> None:
    """Append one step of the plan to the chain, its arguments as llama.cpp's samplers take them.

    The truncation samplers get min_keep 1 (they never leave no token to draw); mirostat
    1.0 estimates over m = 100 tokens, as llama.cpp's common/sampling.cpp passes.
    """
    match step:
        case Greedy():
            sampler.add_greedy()
        case TopK(k):
            sampler.add_top_k(k)
        case Typical(p):
            sampler.add_typical(p, 1)
        case TopP(p):
            sampler.add_top_p(p, 1)
        case MinP(p):
            sampler.add_min_p(p, 1)
        case Temp(temperature):
            sampler.add_temp(temperature)
        case Dist(seed):
            sampler.add_dist(seed)
        case Mirostat(seed, tau, eta):
            sampler.add_mirostat(n_vocab, seed, tau, eta, 100)
        case MirostatV2(seed, tau, eta):
            sampler.add_mirostat_v2(seed, tau, eta)
        case _:
            assert_never(step)


def build_sampler(model: GgufModel, sp: SamplerPlan) -> LlamaSampler:
    """A llama.cpp sampler chain for the plan; an unparsable grammar is InvalidRequest."""
    sampler = LlamaSampler()
    if sp.logit_bias:
        sampler.add_logit_bias(model.n_vocab, sp.logit_bias)
    if sp.penalties is not None:
        pen = sp.penalties
        sampler.add_penalties(model.n_vocab, pen.last_n, pen.repeat, pen.frequency, pen.presence)
    if sp.grammar is not None:
        gbnf = grammar_text(sp.grammar)
        # Added by hand: llama.cpp returns NULL for a grammar it cannot parse, and
        # LlamaSampler.add_grammar would put that NULL into the chain.
        native = llama_cpp.llama_sampler_init_grammar(model.vocab, gbnf.encode(), b"root")
        if not native:
            sampler.close()
            raise InvalidRequest("the grammar does not parse as GBNF", param="grammar")
        llama_cpp.llama_sampler_chain_add(sampler.sampler, native)
    for step in sp.steps:
        add_step(sampler, step, model.n_vocab)
    return sampler


def token_logprob(
    model: GgufModel, ctx: llama_cpp.llama_context_p, idx: int, token: int, top_n: int
) -> TokenLogprob:
    """Log-probability of the sampled token under the model's raw distribution, with the top n
    (the logits at batch index ``idx``)."""
    ptr = llama_cpp.llama_get_logits_ith(ctx, idx)
    logits = np.ctypeslib.as_array(ptr, shape=(model.n_vocab,))
    top = float(logits.max())
    lse = top + math.log(float(np.exp(logits - top).sum()))
    alternatives: list[TopLogprob] = []
    if top_n:
        best = np.argpartition(-logits, top_n)[:top_n]
        for t in best[np.argsort(-logits[best])]:
            alternatives.append(
                TopLogprob(token=_text(model, int(t)), logprob=float(logits[t]) - lse)
            )
    return TokenLogprob(
        token=_text(model, token), logprob=float(logits[token]) - lse, top_logprobs=alternatives
    )


def _text(model: GgufModel, token: int) -> str:
    return model.piece(token).decode(errors="replace")


class _Output:
    """Turns token bytes into releasable text: UTF-8 reassembly, then the stop holdback."""

    def __init__(self, stops: Sequence[str], emit: Callable[[Piece], None]) -> None:
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.holdback = StopHoldback(stops)
        self.emit = emit
        self.tokens = 0
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = None
        self.mute = 0  # characters of released text not to send (a continuation's delivered text)

    def replay(self, model: GgufModel, token_ids: Sequence[int], delivered: str) -> bool:
        """Feed what an earlier attempt delivered, sending none of it; True when it had stopped.

        The holdback and the UTF-8 decoder end up exactly as the first worker's were, so
        the text that follows continues the client's text without repeating any of it.
        """
        self.mute = len(delivered)
        stopped = any(self.token(model.piece(t), t, None) for t in token_ids)
        self.tokens, self.token_ids, self.mute = 0, [], 0
        return stopped

    def token(self, data: bytes, token_id: int, logprob: TokenLogprob | None) -> bool:
        """Take one token; True when a stop string completed."""
        self.tokens += 1
        self.token_ids.append(token_id)
        if logprob is not None:
            self.logprobs = self.logprobs or []
            self.logprobs.append(logprob)
        self._send(self.holdback.push(self.utf8.decode(data)))
        return self.holdback.stopped

    def finish(self) -> None:
        """Generation ended: release what was held (unless a stop string swallowed it)."""
        self._send(self.holdback.push(self.utf8.decode(b"", final=True)) + self.holdback.flush())

    def _send(self, text: str) -> None:
        if self.mute:
            muted = min(self.mute, len(text))
            text, self.mute = text[muted:], self.mute - muted
        if text:
            self.emit(Piece(text, self.tokens, self.logprobs, self.token_ids))
            self.tokens, self.token_ids, self.logprobs = 0, [], None


class Generation:
    """One job's part of a batch: what it must evaluate, then one sampled token per step.

    Made off the scheduler thread (tokenizing and compiling a grammar take time, and only
    read the model); then only the scheduler thread touches it. The prompt and a
    continuation's delivered tokens are ``known``: the scheduler evaluates them (all but a
    reused prefix), then calls ``sample`` with the batch index of each step's logits and
    evaluates the token it returns in the next step, until it returns None.
    """

    def __init__(self, model: GgufModel, job: TextJob, emit: Callable[[Piece], None]) -> None:
        p = job.params
        self.model = model
        self.prompt = model.prompt_tokens(p)
        resumed = job.resume.token_ids if job.resume else []
        model.check_tokens(resumed)
        self.budget = token_budget(p.max_tokens, len(self.prompt), model.n_ctx, model.config.id)
        self.sampler = build_sampler(
            model, plan(p, n_vocab=model.n_vocab, n_ctx=model.n_ctx, eog=model.eog)
        )
        self.top_n = (p.top_logprobs or 0) if p.logprobs else None
        self.out = _Output(p.stop, emit)
        self.seed = p.seed
        self.cache_prompt = p.cache_prompt
        self.known = self.prompt + list(resumed)
        self.resumed = len(resumed)
        self.n = len(resumed)
        self.cache_n = 0  # known tokens whose cells were reused, not evaluated
        self.was_admitted = False
        self.reason: FinishReason | None = None
        self.t_admitted = self.t_first = self.t_end = time.perf_counter()
        try:
            # A continuation: the delivered tokens go through the sampler chain (penalties and
            # grammars see them) and through the output (the holdback sees them), but none is
            # sent.
            for t in resumed:
                llama_cpp.llama_sampler_accept(self.sampler.sampler, t)
            stopped = self.out.replay(model, resumed, job.resume.text) if job.resume else False
        except BaseException:
            self.sampler.close()
            raise
        if stopped or len(resumed) >= self.budget:  # the first attempt had ended its text
            self.out.finish()
            self._end("stop" if stopped else "length")

    def admitted(self, cache_n: int) -> None:
        """The scheduler gave it a sequence, reusing the cells of ``cache_n`` known tokens."""
        self.cache_n = cache_n
        self.was_admitted = True
        self.t_admitted = self.t_first = time.perf_counter()

    def sample(self, ctx: llama_cpp.llama_context_p, idx: int) -> int | None:
        """Sample from the logits at batch index ``idx``: the token to evaluate next, or None
        when the text has ended (a stop, the budget)."""
        if self.n == self.resumed:
            self.t_first = time.perf_counter()
        token: int = llama_cpp.llama_sampler_sample(self.sampler.sampler, ctx, idx)
        if token in self.model.eog:  # not counted: it ends the text, it is not part of it
            self.out.finish()
            self._end("stop")
            return None
        self.n += 1
        lp = None
        if self.top_n is not None:
            lp = token_logprob(self.model, ctx, idx, token, self.top_n)
        if self.out.token(self.model.piece(token), token, lp):
            self._end("stop")
            return None
        if self.n >= self.budget:
            self.out.finish()
            self._end("length")
            return None
        return token

    def cancel(self) -> None:
        """Stop here (a cancel, a deadline, the engine closing): release what was held."""
        if self.reason is None:
            if self.n == self.resumed:
                self.t_first = time.perf_counter()
            self.out.finish()
            self._end("cancelled")

    def _end(self, reason: FinishReason) -> None:
        self.reason = reason
        self.t_end = time.perf_counter()

    def done(self) -> Done:
        """The job's ``Done`` (once it has ended); the sampler chain is freed."""
        assert self.reason is not None
        self.sampler.close()
        n, prompt_n = self.n, len(self.prompt)
        return Done(
            finish_reason=self.reason,
            usage=Usage(prompt_tokens=prompt_n, completion_tokens=n, total_tokens=prompt_n + n),
            timings=Timings(
                prompt_n=len(self.known) - self.cache_n if self.was_admitted else 0,
                prompt_ms=(self.t_first - self.t_admitted) * 1000,
                predicted_n=n - self.resumed,
                predicted_ms=(self.t_end - self.t_first) * 1000,
                cache_n=self.cache_n,
            ),
            seed=self.seed,
            stop_word=self.out.holdback.word,
        )
