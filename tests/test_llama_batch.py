"""Continuous batching and the prompt-prefix cache of the llama.cpp engine, on the real SmolLM2.

The engine is driven directly (no NATS): what is tested here is how sequences share one
context, one batch per step and the cached cells.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from schemas.errors import ContextLengthExceeded, InvalidRequest
from schemas.events import Delta, Done
from schemas.jobs import ChatMessage, TextJob
from tests.conftest import text_job

pytest.importorskip("llama_cpp", reason="the llm extra is not installed (make install-llm)")

from workers.engines.batch import Sequence
from workers.engines.decode import Generation, Piece, Signals
from workers.engines.gguf import DEFAULT_MODEL_ID, ModelConfig, bundled_gguf
from workers.engines.host_cache import common_prefix
from workers.engines.llama import LlamaEngine
from workers.engines.thread_stream import ThreadStream

MODEL = DEFAULT_MODEL_ID
GREEDY: dict[str, Any] = {"temperature": 0, "ignore_eos": True}
PROMPTS = [
    "Write a short poem about the sea.",
    "Name three colours.",
    "What is the capital of France?",
    "Tell me about cats.",
]


# The KV cache's two layouts (gguf.new_context): a stream per slot (the default), or one.
LAYOUTS = pytest.mark.parametrize("kv_unified", [False, True], ids=["split", "unified"])


def engine(slots: int = 1, n_ctx: int = 1024, **config: Any) -> LlamaEngine:
    # One thread: no OpenMP team, whose spinning barrier crawls when the cores are shared.
    return LlamaEngine(
        [
            ModelConfig(
                id=MODEL, path=bundled_gguf(), n_ctx=n_ctx, n_threads=1, contexts=slots, **config
            )
        ]
    )


def job(prompt: str = PROMPTS[0], **params: Any) -> TextJob:
    return text_job(prompt, model=MODEL, **params)


def ids_job(tokens: list[int], **params: Any) -> TextJob:
    """A job whose prompt is token ids (no chat template)."""
    j = job(**params)
    return j.model_copy(
        update={"params": j.params.model_copy(update={"messages": None, "prompt": tokens})}
    )


async def run(
    llama: LlamaEngine, j: TextJob, cancel: threading.Event | None = None, cancel_after: int = 0
) -> tuple[str, Done]:
    cancel = cancel or threading.Event()
    text, tokens = "", 0
    async for event in llama.run(j, cancel):
        if isinstance(event, Delta):
            text += event.text
            tokens += event.tokens
            if cancel_after and tokens >= cancel_after:
                cancel.set()
        else:
            assert isinstance(event, Done)
            return text, event
    raise AssertionError("no done")


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3, 4], [1, 2, 3, 4], 10) == 4
    assert common_prefix([1, 2, 3, 4], [1, 2, 3, 4], 3) == 3
    assert common_prefix([1, 2, 3, 4], [1, 2, 9, 4, 5], 10) == 2
    assert common_prefix([5], [1, 2], 10) == 0
    assert common_prefix([], [1, 2], 10) == 0
    assert common_prefix(list(range(1000)), [*range(777), -1], 2000) == 777


async def together(llama: LlamaEngine, jobs: list[TextJob]) -> list[tuple[str, Done, list[float]]]:
    """Run the jobs in the same steps: prepared first, then handed to the scheduler at once
    (nothing awaited in between), so their prompts share one batch."""
    model = llama.model(MODEL)
    streams = []
    for j in jobs:
        stream: ThreadStream[Piece, Done] = ThreadStream()
        gen = await asyncio.to_thread(Generation, model, j, stream.send)
        streams.append((Sequence(j, gen, Signals(threading.Event()), stream), stream))
    for seq, _ in streams:
        llama.batcher(MODEL).submit(seq)
    out = []
    for _, stream in streams:
        pieces = [p async for batch in stream.batches() for p in batch]
        logprobs = [lp.logprob for p in pieces for lp in p.logprobs or ()]
        out.append(("".join(p.text for p in pieces), stream.result, logprobs))
    return out


@LAYOUTS
async def test_concurrent_jobs_decode_in_shared_steps(kv_unified: bool) -> None:
    llama = engine(slots=4, kv_unified=kv_unified)
    params: dict[str, Any] = {"max_tokens": 16, "cache_prompt": False, **GREEDY}
    await llama.start()
    try:
        batcher = llama.batcher(MODEL)
        steps, tokens = batcher.steps, batcher.tokens
        results = await asyncio.gather(*(run(llama, job(p, **params)) for p in PROMPTS))
        steps, tokens = batcher.steps - steps, batcher.tokens - tokens
    finally:
        await llama.close()
    assert all(d.usage.completion_tokens == 16 for _, d in results)
    assert len({t for t, _ in results}) == 4
    # 4 prompts and 4 x 15 generated tokens evaluated: far fewer steps than tokens.
    assert tokens == sum(d.timings.prompt_n for _, d in results) + 4 * 15
    assert steps <= 15 + 4


@LAYOUTS
async def test_a_sequence_never_reads_another_sequences_cells(kv_unified: bool) -> None:
    # A beside X, then A beside Y (the same lengths, other tokens), in the same steps: A's
    # logits come out bit-identical. (Beside nothing, or in steps of other sizes, they would
    # not: llama.cpp's kernels round differently for other batch sizes, and without flash
    # attention for other cell placements; measured up to 0.17 in a first token's logprob.)
    llama = engine(slots=2, kv_unified=kv_unified)
    params: dict[str, Any] = {"max_tokens": 12, "logprobs": True, "cache_prompt": False, **GREEDY}
    await llama.start()
    try:
        x = await together(llama, [job(**params), ids_job(list(range(1000, 1030)), **params)])
        y = await together(llama, [job(**params), ids_job(list(range(5000, 5030)), **params)])
    finally:
        await llama.close()
    assert x[1][0] != y[1][0]  # the neighbours wrote different things
    assert x[0][0] == y[0][0]
    assert x[0][2] == y[0][2]
    assert len(x[0][2]) == 12


@LAYOUTS
async def test_a_job_reuses_the_prefix_of_a_running_sequence(kv_unified: bool) -> None:
    # A's prompt is in cells and A still generates when B, sharing its first 40 tokens,
    # arrives: B evaluates only the rest (unified: the cells are tagged with B's id too;
    # split: copied into B's stream, A's tail past the prefix removed there).
    llama = engine(slots=2, kv_unified=kv_unified)
    shared = list(range(1000, 1040))
    await llama.start()
    try:
        events = llama.run(ids_job([*shared, 7], max_tokens=40, **GREEDY), threading.Event())
        async for event in events:
            if isinstance(event, Delta):
                break  # A's prompt is evaluated: its first token came out
        text_b, b = await run(llama, ids_job([*shared, 9, 9], max_tokens=4, **GREEDY))
        rest = [e async for e in events]
    finally:
        await llama.close()
    assert b.timings.cache_n == len(shared)
    assert b.timings.prompt_n == 2
    assert text_b
    a = rest[-1]
    assert isinstance(a, Done)
    assert a.usage.completion_tokens == 40  # A went on to the end


async def test_split_streams_keep_the_running_sequences_at_consecutive_ids() -> None:
    # Three jobs on streams 0, 1 and 2; the one on 1 ends first: the one on 2 is moved down
    # to 1 (llama.cpp would cut every later step in two at the gap) and goes on as it would
    # have: its tokens and their logprobs are a lone run's (other batch sizes move the
    # logprobs by < 0.2; a misplaced cell, by whole nats).
    llama = engine(slots=3)
    params: dict[str, Any] = {"logprobs": True, "cache_prompt": False, **GREEDY}
    await llama.start()
    try:
        batcher = llama.batcher(MODEL)
        [alone] = await together(llama, [job(PROMPTS[2], max_tokens=24, **params)])
        gapped = batcher.gapped
        a, b, c = await together(
            llama,
            [
                job(PROMPTS[0], max_tokens=24, **params),
                job(PROMPTS[1], max_tokens=2, **params),
                job(PROMPTS[2], max_tokens=24, **params),
            ],
        )
    finally:
        await llama.close()
    assert [r[1].usage.completion_tokens for r in (a, b, c)] == [24, 2, 24]
    assert batcher.moves == 1
    assert batcher.gapped == gapped == 0
    assert c[0] == alone[0]
    assert max(abs(x - y) for x, y in zip(c[2], alone[2], strict=True)) < 0.5


def next_turn(first: TextJob, reply: str, line: str) -> TextJob:
    """The conversation's next turn: the first job's messages, its reply and a new line."""
    history = [
        *(first.params.messages or []),
        ChatMessage(role="assistant", content=reply),
        ChatMessage(role="user", content=line),
    ]
    return first.model_copy(
        update={"params": first.params.model_copy(update={"messages": history})}
    )


async def test_a_next_turn_reuses_the_cached_prefix_and_cache_prompt_false_does_not() -> None:
    llama = engine()
    await llama.start()
    try:
        first = job(PROMPTS[0], max_tokens=20, **GREEDY)
        reply, done1 = await run(llama, first)
        turn = next_turn(first, reply, "Now one about the mountains.")
        _, done2 = await run(llama, turn)
        uncached = turn.model_copy(
            update={"params": turn.params.model_copy(update={"cache_prompt": False})}
        )
        _, done3 = await run(llama, uncached)
    finally:
        await llama.close()
    assert done1.timings.cache_n == 0
    assert done1.timings.prompt_n == done1.usage.prompt_tokens
    # The second turn starts with the first's prompt and (most of) its reply, all in cells.
    assert done2.timings.cache_n >= done1.usage.prompt_tokens
    assert done2.timings.prompt_n == done2.usage.prompt_tokens - done2.timings.cache_n
    assert done3.timings.cache_n == 0
    assert done3.timings.prompt_n == done3.usage.prompt_tokens


async def test_a_repeated_prompt_evaluates_only_its_last_token() -> None:
    llama = engine()
    await llama.start()
    try:
        _, first = await run(llama, job(max_tokens=4, **GREEDY))
        _, again = await run(llama, job(max_tokens=4, **GREEDY))
    finally:
        await llama.close()
    assert again.timings.cache_n == first.usage.prompt_tokens - 1
    assert again.timings.prompt_n == 1


@LAYOUTS
async def test_a_chat_sharing_only_its_start_leaves_a_conversation_cached(
    kv_unified: bool,
) -> None:
    # A conversation's first turn, then an unrelated chat (it shares the chat template's
    # first tokens with it): the conversation's next turn still finds its history in cells.
    llama = engine(slots=2, kv_unified=kv_unified)
    await llama.start()
    try:
        first = job(PROMPTS[0], max_tokens=12, **GREEDY)
        reply, done1 = await run(llama, first)
        _, other = await run(llama, job(PROMPTS[3], max_tokens=4, **GREEDY))
        turn = next_turn(first, reply, "And the mountains?")
        _, done2 = await run(llama, turn)
    finally:
        await llama.close()
    assert other.timings.cache_n < other.usage.prompt_tokens  # the template's start at most
    assert done2.timings.cache_n >= done1.usage.prompt_tokens


async def _first_logprob(llama: LlamaEngine, j: TextJob) -> tuple[float, Done]:
    """The job's first token's logprob and its done event."""
    first = None
    async for event in llama.run(j, threading.Event()):
        if isinstance(event, Delta):
            if first is None and event.logprobs:
                first = event.logprobs[0]
        else:
            assert isinstance(event, Done)
            assert first is not None
            return first.logprob, event
    raise AssertionError("no done")


@LAYOUTS
async def test_a_prompt_the_kv_cache_let_go_is_copied_back_from_host_memory(
    kv_unified: bool,
) -> None:
    # One cached sequence in cells: the second prompt's pushes the first's out, to host
    # memory; the first prompt again is copied back and evaluates only its last token.
    llama = engine(cache_seqs=1, cache_ram_mib=64, kv_unified=kv_unified)
    params: dict[str, Any] = {"max_tokens": 8, "logprobs": True, **GREEDY}
    await llama.start()
    try:
        host = llama.batcher(MODEL).host
        lp1, done1 = await _first_logprob(llama, job(PROMPTS[0], **params))
        _, other = await _first_logprob(llama, job(PROMPTS[3], **params))
        saved = len(host)
        lp2, again = await _first_logprob(llama, job(PROMPTS[0], **params))
    finally:
        await llama.close()
    assert saved == 1
    assert host.restores == 1
    assert other.timings.cache_n < other.usage.prompt_tokens - 1  # the template's start at most
    assert again.timings.cache_n == done1.usage.prompt_tokens - 1
    assert again.timings.prompt_n == 1
    # The cells came back as they were: the same distribution for the first token (a
    # misplaced or foreign cell would move it by whole nats; other batch sizes, by < 0.2).
    assert abs(lp2 - lp1) < 0.5


async def test_a_taken_stream_is_set_aside_only_when_the_job_drops_16_tokens_of_it() -> None:
    # Split, one slot: its stream holds the last job's cells. A job that keeps all but a few
    # of them (a conversation's next turn) takes them over with no copy; one that drops 16
    # or more has them saved to host memory first.
    llama = engine(cache_ram_mib=64)
    prompt = list(range(1000, 1040))
    await llama.start()
    try:
        host = llama.batcher(MODEL).host
        await run(llama, ids_job(prompt, max_tokens=8, **GREEDY))  # cells: 40 + 7 tokens
        _, next_turn = await run(llama, ids_job([*prompt, 5, 6], max_tokens=8, **GREEDY))
        kept = host.saves
        _, other = await run(llama, ids_job([*prompt[:10], *range(3000, 3030)], max_tokens=8,
                                             **GREEDY))  # fmt: skip
    finally:
        await llama.close()
    assert next_turn.timings.cache_n == len(prompt)  # drops 7 generated tokens' cells
    assert kept == 0
    assert other.timings.cache_n == 10  # drops 39 of the 49 cells: they were saved first
    assert host.saves == 1


async def test_a_copy_back_makes_room_by_saving_the_cached_sequence_in_the_way() -> None:
    # Unified, 256 cells, two 158-cell sequences: the second pushes the first out of cells
    # (it is saved); the first again finds no room to come back until the second is saved.
    llama = engine(n_ctx=256, cache_seqs=1, cache_ram_mib=64, kv_unified=True)
    a, b = list(range(1000, 1150)), list(range(5000, 5150))
    await llama.start()
    try:
        host = llama.batcher(MODEL).host
        await run(llama, ids_job(a, max_tokens=8, **GREEDY))
        await run(llama, ids_job(b, max_tokens=8, **GREEDY))
        saved = host.saves
        _, again = await run(llama, ids_job(a, max_tokens=8, **GREEDY))
    finally:
        await llama.close()
    assert saved == 1  # a, pushed out by b's prompt
    assert again.timings.cache_n == len(a) - 1
    assert host.restores == 1
    assert host.saves == 2  # b, saved to make room for a


async def test_the_host_memory_budget_lets_the_least_recently_saved_go() -> None:
    # 1 MiB holds one 28-token sequence of SmolLM2 (22.5 KiB a token), not two.
    llama = engine(cache_seqs=1, cache_ram_mib=1)
    prompts = [list(range(k, k + 20)) for k in (1000, 2000, 3000)]
    await llama.start()
    try:
        for tokens in prompts:
            await run(llama, ids_job(tokens, max_tokens=8, **GREEDY))
        # In cells: the third; in host memory: the second (the first was let go for it).
        _, second = await run(llama, ids_job(prompts[1], max_tokens=8, **GREEDY))
        _, first = await run(llama, ids_job(prompts[0], max_tokens=8, **GREEDY))
    finally:
        await llama.close()
    assert first.timings.cache_n == 0
    assert second.timings.cache_n == len(prompts[1]) - 1


@LAYOUTS
async def test_more_conversations_than_cached_sequences_keep_their_history(
    kv_unified: bool,
) -> None:
    # Three conversations, one cached sequence in cells: every next turn still finds its
    # history, in host memory; without it, only the chat template's start.
    results = {}
    for ram in (64, 0):
        llama = engine(cache_seqs=1, cache_ram_mib=ram, kv_unified=kv_unified)
        await llama.start()
        try:
            firsts = [job(p, max_tokens=8, **GREEDY) for p in PROMPTS[:3]]
            replies = [await run(llama, f) for f in firsts]
            turns = [
                await run(llama, next_turn(f, reply, "Say more."))
                for f, (reply, _) in zip(firsts, replies, strict=True)
            ]
        finally:
            await llama.close()
        results[ram] = [(d1.usage.prompt_tokens, d2.timings.cache_n) for (_, d1), (_, d2)
                        in zip(replies, turns, strict=True)]  # fmt: skip
    assert all(cached >= prompt for prompt, cached in results[64])
    assert all(cached < prompt for prompt, cached in results[0][:2])  # pushed out, not saved


async def test_held_text_goes_out_before_a_step_that_evaluates_a_prompt() -> None:
    # An interval far longer than the job: after its first token, its text would wait for
    # its end; a second job's prompt makes a long step, and what is held goes out before it.
    llama = engine(slots=2, stream_interval_s=60.0)
    await llama.start()
    try:
        first = llama.run(job(PROMPTS[0], max_tokens=120, **GREEDY), threading.Event())
        events = [await anext(first)]  # the first token, at once
        await asyncio.sleep(0.3)  # more tokens sampled, and held
        second = asyncio.create_task(run(llama, job("sea " * 300, max_tokens=2, **GREEDY)))
        events += [e async for e in first]
        await second
    finally:
        await llama.close()
    deltas = [e for e in events if isinstance(e, Delta)]
    assert deltas[0].tokens == 1
    # the first token, what was held when the prompt's step came, the rest at the end
    assert len(deltas) >= 3
    assert sum(d.tokens for d in deltas) == 120


async def test_a_bad_grammar_fails_its_own_job_only() -> None:
    llama = engine(slots=2)
    await llama.start()
    try:
        good, bad = await asyncio.gather(
            run(llama, job(max_tokens=8, **GREEDY)),
            run(llama, job(max_tokens=8, grammar="root ::= (")),
            return_exceptions=True,
        )
        after = await run(llama, job(max_tokens=3, **GREEDY))
    finally:
        await llama.close()
    assert isinstance(bad, InvalidRequest)
    assert bad.param == "grammar"
    assert not isinstance(good, BaseException)
    assert good[1].usage.completion_tokens == 8
    assert after[1].usage.completion_tokens == 3


async def test_a_cancelled_sequence_leaves_the_others_running() -> None:
    llama = engine(slots=2)
    await llama.start()
    try:
        kept, cancelled = await asyncio.gather(
            run(llama, job(PROMPTS[0], max_tokens=40, **GREEDY)),
            run(llama, job(PROMPTS[1], max_tokens=400, **GREEDY), cancel_after=3),
        )
    finally:
        await llama.close()
    assert cancelled[1].finish_reason == "cancelled"
    assert 3 <= cancelled[1].usage.completion_tokens <= 4  # at most one token after the cancel
    assert kept[1].finish_reason == "length"
    assert kept[1].usage.completion_tokens == 40


async def test_long_prompts_wait_for_room_and_fill_the_context_in_turns() -> None:
    # 2 slots of 256 tokens: 512 cells. Six jobs of about 220 tokens each, prompts that share
    # little: the first two run, the rest wait for a sequence; finished ones stay cached until
    # a new one needs their cells (llama_decode finds no room, the oldest cached is dropped).
    llama = engine(slots=2, n_ctx=256)
    words = ["sea", "sky", "tree", "stone", "river", "cloud"]
    jobs = [job(" ".join([w] * 150), max_tokens=40, **GREEDY) for w in words]
    await llama.start()
    try:
        results = await asyncio.gather(*(run(llama, j) for j in jobs))
        with pytest.raises(ContextLengthExceeded):
            await run(llama, job("sea " * 400, max_tokens=4))
        _, after = await run(llama, job(max_tokens=2, **GREEDY))
    finally:
        await llama.close()
    for _, done in results:
        assert done.finish_reason == "length"
        assert done.usage.completion_tokens == 40
        assert done.usage.prompt_tokens + 40 <= 256
    assert after.usage.completion_tokens == 2


async def test_closing_ends_running_sequences_as_cancelled() -> None:
    llama = engine(slots=2)
    await llama.start()
    started = asyncio.Event()

    async def consume() -> Done:
        done = None
        async for event in llama.run(job(max_tokens=500, **GREEDY), threading.Event()):
            started.set()
            if isinstance(event, Done):
                done = event
        assert done is not None
        return done

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 30)
    await llama.close()
    done = await asyncio.wait_for(task, 30)
    assert done.finish_reason == "cancelled"
    assert done.usage.completion_tokens < 500


def test_the_kv_layout_comes_from_the_flag_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from headrace.cli import _LLM, _overrides, build_parser
    from headrace.worker import llama_engine
    from workers.settings import WorkerSettings

    def layout(argv: list[str]) -> bool:
        args = build_parser().parse_args(["worker", "llm", *argv])
        settings = WorkerSettings(**_overrides(args, _LLM))
        (config,) = llama_engine(settings).configs.values()
        return config.kv_unified

    assert layout([]) is False  # a stream per slot
    assert layout(["--kv-unified"]) is True
    monkeypatch.setenv("HEADRACE_LLM_KV_UNIFIED", "1")
    assert layout([]) is True
