"""The token loop of one job, run in a worker thread on a borrowed llama.cpp context.

It evaluates the prompt, then samples one token at a time with a chain built
from the job's ``SamplerPlan``, checking the cancel flags before every token,
and hands each releasable piece of text to ``emit`` (the engine coalesces them
into deltas on the event loop).
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


def token_logprob(model: GgufModel, llm: llama_cpp.Llama, token: int, top_n: int) -> TokenLogprob:
    """Log-probability of the sampled token under the model's raw distribution, with the top n."""
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    logits = np.ctypeslib.as_array(ptr, shape=(model.n_vocab,))
    top = float(logits.max())
    lse = top + math.log(float(np.exp(logits - top).sum()))
    alternatives: list[TopLogprob] = []
    if top_n:
        best = np.argpartition(-logits, top_n)[:top_n]
        for t in best[np.argsort(-logits[best])]:
            alternatives.append(
                TopLogprob(token=_text(model, int(t)), logprob=float(logits[t]) - lse, id=int(t))
            )
    return TokenLogprob(
        token=_text(model, token),
        logprob=float(logits[token]) - lse,
        top_logprobs=alternatives,
        id=token,
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


def generate(
    model: GgufModel,
    llm: llama_cpp.Llama,
    job: TextJob,
    signals: Signals,
    emit: Callable[[Piece], None],
) -> Done:
    """Run one job to its ``Done`` on ``llm`` (which nobody else may touch meanwhile)."""
    p = job.params
    prompt = model.prompt_tokens(p)
    resumed = job.resume.token_ids if job.resume else []
    model.check_tokens(resumed)
    budget = token_budget(p.max_tokens, len(prompt), model.n_ctx, model.config.id)
    sampler = build_sampler(model, plan(p, n_vocab=model.n_vocab, n_ctx=model.n_ctx, eog=model.eog))
    top_n = (p.top_logprobs or 0) if p.logprobs else None
    out = _Output(p.stop, emit)
    try:
        # A continuation: the delivered tokens go through the sampler chain (penalties and
        # grammars see them) and through the output (the holdback sees them), but none is sent.
        for t in resumed:
            llama_cpp.llama_sampler_accept(sampler.sampler, t)
        stopped = out.replay(model, resumed, job.resume.text) if job.resume else False
        t0 = time.perf_counter()
        evaluated = _eval_prompt(llm, prompt, model.config.n_batch, signals)
        evaluated = evaluated and _eval_replay(llm, resumed, signals)
        t1 = time.perf_counter()
        loop = _Loop(model, llm, sampler, signals, out, top_n)
        if not evaluated:
            reason, n = "cancelled", len(resumed)
        elif stopped or len(resumed) >= budget:  # the first attempt had ended its text already
            out.finish()
            reason, n = ("stop" if stopped else "length"), len(resumed)
        else:
            reason, n = loop.run(budget, start=len(resumed))
        t2 = time.perf_counter()
    finally:
        sampler.close()
    return Done(
        finish_reason=reason,
        usage=Usage(prompt_tokens=len(prompt), completion_tokens=n, total_tokens=len(prompt) + n),
        timings=Timings(
            prompt_n=len(prompt) + len(resumed),
            prompt_ms=(t1 - t0) * 1000,
            predicted_n=n - len(resumed),
            predicted_ms=(t2 - t1) * 1000,
        ),
        seed=p.seed,
        stop_word=out.holdback.word,
    )


def _eval_prompt(llm: llama_cpp.Llama, prompt: list[int], n_batch: int, signals: Signals) -> bool:
    """Evaluate the prompt batch by batch (a cancel is heard between batches); False if cancelled.

    Every job evaluates its whole prompt (no KV prefix reuse between jobs), so
    its logits never depend on what the context ran before: a redelivered job
    must repeat itself on any worker. On the CPU the text is the same for any
    thread count or batch size (checked); GPU kernels may depend on how a
    prompt is split, which prefix reuse would change from job to job.
    """
    llm.reset()
    for i in range(0, len(prompt), n_batch):
        if signals.is_set():
            return False
        llm.eval(prompt[i : i + n_batch])
    return True


def _eval_replay(llm: llama_cpp.Llama, tokens: list[int], signals: Signals) -> bool:
    """Evaluate a continuation's delivered tokens one by one, as they were evaluated when they
    were generated; False if cancelled.

    One at a time, not as a batch: the logits of a batched evaluation differ in the last
    bits from one token at a time (other kernels), enough to flip a greedy choice, and
    a continuation at temperature 0 must go on as the interrupted run would have.
    """
    for t in tokens:
        if signals.is_set():
            return False
        llm.eval([t])
    return True


class _Loop:
    """Samples one token at a time until a stop, the budget, or a cancel."""

    def __init__(
        self,
        model: GgufModel,
        llm: llama_cpp.Llama,
        sampler: LlamaSampler,
        signals: Signals,
        out: _Output,
        top_n: int | None,
    ) -> None:
        self.model = model
        self.llm = llm
        self.sampler = sampler
        self.signals = signals
        self.out = out
        self.top_n = top_n

    def run(self, budget: int, start: int = 0) -> tuple[FinishReason, int]:
        """The finish reason and the number of tokens generated (``start`` of them before)."""
        n = start
        while True:
            if self.signals.is_set():  # checked before every token: a cancel costs at most one
                self.out.finish()
                return "cancelled", n
            token: int = llama_cpp.llama_sampler_sample(self.sampler.sampler, self.llm.ctx, -1)
            if token in self.model.eog:  # not counted: it ends the text, it is not part of it
                self.out.finish()
                return "stop", n
            n += 1
            lp = None
            if self.top_n is not None:
                lp = token_logprob(self.model, self.llm, token, self.top_n)
            if self.out.token(self.model.piece(token), token, lp):
                return "stop", n
            if n >= budget:
                self.out.finish()
                return "length", n
            self.llm.eval([token])
