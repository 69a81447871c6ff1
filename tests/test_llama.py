"""The llama.cpp engine with the real SmolLM2-135M-Instruct, through the runtime and a real nats-server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from schemas.client import JobClient, Received
from schemas.codec import decode_worker
from schemas.errors import ErrorCode, ModelNotFound
from schemas.events import Delta, Done, Error, Started
from schemas.jobs import Resume
from schemas.subjects import WORKERS_BUCKET, rpc_subject, worker_key
from tests.conftest import collect, running, text_job, wait_registered
from workers.settings import TEXT_SLOTS, WorkerSettings

pytest.importorskip("llama_cpp", reason="the llm extra is not installed (make install-llm)")

from workers.engines.gguf import DEFAULT_MODEL_ID, ModelConfig, bundled_gguf
from workers.engines.llama import LlamaEngine

MODEL = DEFAULT_MODEL_ID
N_CTX = 1024
POEM = "Write a short poem about the sea."


def new_engine() -> LlamaEngine:
    # One thread: no OpenMP team, whose spinning barrier crawls when the cores are shared.
    return LlamaEngine([ModelConfig(id=MODEL, path=bundled_gguf(), n_ctx=N_CTX, n_threads=1)])


@pytest.fixture(scope="module")
def engine() -> LlamaEngine:
    """One engine for the module: each runtime start()s it (about 0.2 s) and close()s it again."""
    return new_engine()


def chat(prompt: str = POEM, **params: Any) -> Any:
    return text_job(prompt, model=MODEL, **params)


def deltas(events: list[Received]) -> list[Delta]:
    return [r.event for r in events if isinstance(r.event, Delta)]


def text_of(events: list[Received]) -> str:
    return "".join(d.text for d in deltas(events))


def done_of(events: list[Received]) -> Done:
    done = events[-1].event
    assert isinstance(done, Done), done
    return done


async def rpc(nc: NATS, op: str, payload: dict[str, Any]) -> dict[str, Any]:
    msg = await nc.request(rpc_subject(MODEL, op), orjson.dumps(payload), timeout=10)
    answer: dict[str, Any] = orjson.loads(msg.data)
    return answer


async def test_chat_streams_started_deltas_done_with_exact_usage(
    client: JobClient, js: JetStreamContext, worker_settings: WorkerSettings, engine: LlamaEngine
) -> None:
    messages = [{"role": "user", "content": POEM}]
    async with running(worker_settings, engine):
        record = (await (await js.key_value(WORKERS_BUCKET)).get(worker_key("w1"))).value
        events = await collect(await client.submit(chat(max_tokens=8, ignore_eos=True)))
        prompt = (await rpc(client.nc, "apply-template", {"messages": messages}))["result"]
        tokens = (await rpc(client.nc, "tokenize", {"content": prompt["prompt"]}))["result"]
    assert record is not None
    info = decode_worker(record)
    assert [(m.id, m.context_length) for m in info.models] == [(MODEL, N_CTX)]
    kinds = [r.event.type for r in events]
    assert kinds[0] == "started"
    assert set(kinds[1:-1]) == {"delta"}
    assert kinds[-1] == "done"
    done = done_of(events)
    assert done.finish_reason == "length"
    assert done.usage.prompt_tokens == len(tokens["tokens"])  # from the tokenizer, not estimated
    assert done.usage.completion_tokens == 8
    assert done.usage.total_tokens == done.usage.prompt_tokens + 8
    assert sum(d.tokens for d in deltas(events)) == 8
    assert done.timings.prompt_n == done.usage.prompt_tokens
    assert done.timings.predicted_n == 8
    assert done.timings.prompt_ms > 0
    assert done.timings.predicted_ms > 0
    assert done.seed == 42
    assert text_of(events).strip()


async def test_same_seed_same_text_on_two_workers(
    client: JobClient, worker_settings: WorkerSettings, engine: LlamaEngine
) -> None:
    other = worker_settings.model_copy(update={"worker_id": "w2"})
    params: dict[str, Any] = {"max_tokens": 24, "seed": 1234, "temperature": 0.9}
    async with running(worker_settings, engine):
        first = await collect(await client.submit(chat(**params)))
    async with running(other, new_engine()):
        second = await collect(await client.submit(chat(**params)))
        reseeded = await collect(await client.submit(chat(**{**params, "seed": 99})))
    assert isinstance(first[0].event, Started)
    assert isinstance(second[0].event, Started)
    assert (first[0].event.worker, second[0].event.worker) == ("w1", "w2")
    assert text_of(first) == text_of(second)
    assert text_of(first) != text_of(reseeded)


async def test_stop_sequence_is_never_sent(
    client: JobClient, worker_settings: WorkerSettings, engine: LlamaEngine
) -> None:
    greedy: dict[str, Any] = {"temperature": 0, "max_tokens": 30, "ignore_eos": True}
    async with running(worker_settings, engine):
        free = text_of(await collect(await client.submit(chat(**greedy))))
        # A stop string taken from the middle of the free text, likely across tokens.
        stop = free[12:17]
        stopped = await collect(await client.submit(chat(**greedy, stop=[stop, "\u2603"])))
    text = text_of(stopped)
    assert stop not in text
    assert text == free[: free.index(stop)]
    done = done_of(stopped)
    assert done.finish_reason == "stop"
    assert done.stop_word == stop
    assert done.usage.completion_tokens >= sum(d.tokens for d in deltas(stopped))


@pytest.mark.parametrize("cut", [1, 4, 9])
@pytest.mark.parametrize("cache_prompt", [True, False])
async def test_a_continuation_goes_on_from_the_delivered_tokens(
    client: JobClient,
    worker_settings: WorkerSettings,
    engine: LlamaEngine,
    cut: int,
    cache_prompt: bool,
) -> None:
    """A job resumed from the first deltas of a run sends exactly the rest of that run's text,
    with a stop string's holdback spanning the cut.

    With the prefix cache the continuation reuses the cells the interrupted run left (here the
    same worker); without it, it evaluates prompt and delivered tokens again, alone, as a
    redelivery to another worker does."""
    greedy: dict[str, Any] = {
        "temperature": 0,
        "max_tokens": 24,
        "ignore_eos": True,
        "cache_prompt": cache_prompt,
    }
    async with running(worker_settings, engine):
        whole = await collect(await client.submit(chat(**greedy)))
        free = text_of(whole)
        stop = free[len(free) // 2 : len(free) // 2 + 4]
        stopped = await collect(await client.submit(chat(**greedy, stop=[stop])))
        first = deltas(stopped)[:cut]
        ids = [t for d in first for t in d.token_ids or ()]
        assert len(ids) == sum(d.tokens for d in first)
        job = chat(**greedy, stop=[stop]).model_copy(
            update={"resume": Resume(token_ids=ids, text="".join(d.text for d in first))}
        )
        rest = await collect(await client.submit(job))
    assert "".join(d.text for d in first) + text_of(rest) == text_of(stopped)
    assert done_of(rest).usage == done_of(stopped).usage
    assert done_of(rest).stop_word == stop


async def test_max_tokens_gives_length_and_that_many_tokens(
    client: JobClient, worker_settings: WorkerSettings, engine: LlamaEngine
) -> None:
    async with running(worker_settings, engine):
        events = await collect(await client.submit(chat(max_tokens=5, ignore_eos=True)))
    done = done_of(events)
    assert done.finish_reason == "length"
    assert done.usage.completion_tokens == 5
    assert sum(d.tokens for d in deltas(events)) == 5


@pytest.mark.parametrize(
    "params",
    [
        {"response_format": "json_object"},
        {
            "response_format": "json_schema",
            "json_schema": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                "required": ["name", "age"],
            },
        },
    ],
    ids=["json_object", "json_schema"],
)
async def test_json_response_formats_parse(
    client: JobClient,
    worker_settings: WorkerSettings,
    engine: LlamaEngine,
    params: dict[str, Any],
) -> None:
    # A prompt whose greedy JSON ends within the budget with flash attention on or off (the
    # two round differently; "as JSON with its name and age" nests on and on with it on).
    job = chat("Describe a cat in JSON: its name and its age.", temperature=0, max_tokens=120)
    job = job.model_copy(update={"params": job.params.model_copy(update=params)})
    async with running(worker_settings, engine):
        events = await collect(await client.submit(job))
    assert done_of(events).finish_reason == "stop"
    value = json.loads(text_of(events))
    assert isinstance(value, dict)
    if "json_schema" in params:
        assert isinstance(value["name"], str)
        assert isinstance(value["age"], int)


async def test_grammar_and_logprobs(
    client: JobClient, worker_settings: WorkerSettings, engine: LlamaEngine
) -> None:
    async with running(worker_settings, engine):
        answer = await collect(
            await client.submit(chat("Is the sea wet?", grammar='root ::= "yes" | "no"'))
        )
        scored = await collect(
            await client.submit(chat(max_tokens=4, logprobs=True, top_logprobs=2, ignore_eos=True))
        )
    assert text_of(answer) in {"yes", "no"}
    assert done_of(answer).finish_reason == "stop"
    for d in deltas(scored):
        assert d.logprobs is not None
        assert len(d.logprobs) == d.tokens
        for lp in d.logprobs:
            assert lp.logprob <= 0
            assert len(lp.top_logprobs) == 2
            assert lp.top_logprobs[0].logprob >= lp.top_logprobs[1].logprob
            assert lp.logprob <= lp.top_logprobs[0].logprob + 1e-9
    assert "".join(lp.token for d in deltas(scored) for lp in d.logprobs or ()) == text_of(scored)


async def test_prompt_over_the_context_is_an_error_event(
    client: JobClient, worker_settings: WorkerSettings, engine: LlamaEngine
) -> None:
    async with running(worker_settings, engine):
        events = await collect(await client.submit(chat("sea " * 2000, max_tokens=4)))
        after = await collect(await client.submit(chat(max_tokens=2)))  # the worker goes on
    error = events[-1].event
    assert isinstance(error, Error)
    assert error.code == ErrorCode.CONTEXT_LENGTH_EXCEEDED
    assert not error.retryable
    assert f"holds {N_CTX}" in error.message
    assert "sea sea" not in error.message
    assert done_of(after).usage.completion_tokens == 2


async def test_cancel_stops_within_one_token(
    client: JobClient, worker_settings: WorkerSettings, engine: LlamaEngine
) -> None:
    async with running(worker_settings, engine):
        stream = await client.submit(chat(max_tokens=500, ignore_eos=True))
        events: list[Received] = []
        received = sent_at = 0
        async for r in stream:
            events.append(r)
            if isinstance(r.event, Delta):
                received += r.event.tokens
                if received >= 3 and not sent_at:
                    await stream.cancel()
                    sent_at = received
    done = done_of(events)
    assert done.finish_reason == "cancelled"
    # The cancel may cross one token already being generated, never more.
    assert sent_at <= done.usage.completion_tokens <= sent_at + 1
    assert received <= done.usage.completion_tokens


async def test_rpc_tokenize_detokenize_round_trip(
    client: JobClient, worker_settings: WorkerSettings, engine: LlamaEngine
) -> None:
    content = "Hello world! headrace streams tokens, 42 of them: é ✓."
    async with running(worker_settings, engine):
        tokens = await rpc(client.nc, "tokenize", {"content": content})
        back = await rpc(client.nc, "detokenize", tokens["result"])
        pieces = await rpc(client.nc, "tokenize", {"content": "Hello world", "with_pieces": True})
        props = await rpc(client.nc, "props", {})
        bad = await rpc(client.nc, "detokenize", {"tokens": ["x"]})
        unknown = await rpc(client.nc, "embed", {})
    ids = tokens["result"]["tokens"]
    assert ids
    assert all(isinstance(t, int) for t in ids)
    assert back["result"]["content"] == content
    assert "".join(p["piece"] for p in pieces["result"]["tokens"]) == "Hello world"
    assert props["result"]["n_ctx"] == N_CTX
    assert props["result"]["model"] == MODEL
    assert "<|im_start|>" in props["result"]["chat_template"]
    assert bad["error"]["code"] == ErrorCode.INVALID_REQUEST
    assert unknown["error"]["code"] == ErrorCode.INVALID_REQUEST


async def test_two_slots_run_side_by_side_with_the_same_output(
    client: JobClient, worker_settings: WorkerSettings
) -> None:
    two = worker_settings.model_copy(update={"slots": 2})
    engine = LlamaEngine(
        [ModelConfig(id=MODEL, path=bundled_gguf(), n_ctx=N_CTX, n_threads=1, contexts=2)]
    )
    job: dict[str, Any] = {"max_tokens": 12, "seed": 5, "ignore_eos": True}
    async with running(two, engine):
        streams = [await client.submit(chat(**job)) for _ in range(2)]
        results = await asyncio.gather(*(collect(s) for s in streams))
    assert text_of(results[0]) == text_of(results[1])
    assert all(done_of(r).usage.completion_tokens == 12 for r in results)


async def test_a_slow_consumer_gets_coalesced_deltas(engine: LlamaEngine) -> None:
    await engine.start()
    try:
        job = chat(max_tokens=40, ignore_eos=True, logprobs=True)
        events = []
        async for event in engine.run(job, threading.Event()):
            events.append(event)
            if len(events) == 1:
                await asyncio.sleep(1.0)  # far slower than the model: pieces queue up meanwhile
    finally:
        await engine.close()
    found = [e for e in events if isinstance(e, Delta)]
    assert len(found) < 40
    assert max(d.tokens for d in found) > 1
    assert sum(d.tokens for d in found) == 40
    assert sum(len(d.logprobs or ()) for d in found) == 40


async def test_a_stream_interval_sends_fewer_larger_deltas_of_the_same_text(
    engine: LlamaEngine,
) -> None:
    paced = LlamaEngine([
        ModelConfig(id=MODEL, path=bundled_gguf(), n_ctx=N_CTX, n_threads=1,
                    stream_interval_s=0.15)
    ])  # fmt: skip
    job = {"max_tokens": 40, "ignore_eos": True, "seed": 3}
    runs = []
    for e in (engine, paced):
        await e.start()
        try:
            started = time.perf_counter()
            runs.append(([ev async for ev in e.run(chat(**job), threading.Event())],
                         time.perf_counter() - started))  # fmt: skip
        finally:
            await e.close()
    (every, _), (coalesced, took_s) = runs
    deltas = [e for e in coalesced if isinstance(e, Delta)]
    assert deltas[0].tokens == 1  # the first token goes out at once
    assert len(deltas) <= took_s / 0.15 + 2
    assert sum(d.tokens for d in deltas) == 40
    assert "".join(d.text for d in deltas) == "".join(e.text for e in every if isinstance(e, Delta))


async def test_the_stream_interval_grows_with_the_jobs_running() -> None:
    # 2 jobs at once with 0.1 s: each sends at most every 0.2 s, so the worker's deltas per
    # second stay those of one job.
    paced = LlamaEngine([
        ModelConfig(id=MODEL, path=bundled_gguf(), n_ctx=N_CTX, n_threads=1, contexts=2,
                    stream_interval_s=0.1)
    ])  # fmt: skip

    async def one(seed: int) -> tuple[list[Delta], float]:
        started = time.perf_counter()
        job = chat(max_tokens=60, ignore_eos=True, seed=seed)
        found = [e async for e in paced.run(job, threading.Event()) if isinstance(e, Delta)]
        return found, time.perf_counter() - started

    await paced.start()
    try:
        runs = await asyncio.gather(one(1), one(2))
    finally:
        await paced.close()
    for deltas, took_s in runs:
        assert sum(d.tokens for d in deltas) == 60
        assert len(deltas) <= took_s / 0.2 + 3


async def test_unknown_model_is_model_not_found(engine: LlamaEngine) -> None:
    await engine.start()
    try:
        with pytest.raises(ModelNotFound):
            async for _ in engine.run(text_job(model="no-such-model"), threading.Event()):
                pass
        with pytest.raises(ModelNotFound):
            await engine.rpc("no-such-model", "props", {})
    finally:
        await engine.close()


def spawn_llm_worker(
    settings: WorkerSettings, worker_id: str, log: Path
) -> subprocess.Popen[bytes]:
    """``headrace worker llm`` as its own process, configured by flags and HEADRACE_ variables."""
    assert settings.nats_user is not None
    assert settings.nats_password is not None
    env = dict(
        os.environ,
        HEADRACE_NATS_URL=settings.nats_url,
        HEADRACE_NATS_USER=settings.nats_user,
        HEADRACE_NATS_PASSWORD=settings.nats_password.get_secret_value(),
        HEADRACE_HEARTBEAT_S="0.3",
        HEADRACE_FETCH_TIMEOUT_S="0.5",
        HEADRACE_LLM_N_CTX="512",
    )
    argv = [sys.executable, "-m", "headrace", "worker", "llm", "--worker-id", worker_id]
    argv += ["--model", f"{MODEL}={bundled_gguf()}", "--threads", "2"]
    with log.open("wb") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=out)


@pytest.mark.slow
async def test_worker_process_serves_llm_and_stops_on_sigterm(
    client: JobClient, js: JetStreamContext, worker_settings: WorkerSettings, tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"
    proc = spawn_llm_worker(worker_settings, "llm-1", log)
    try:
        await wait_registered(js, "llm-1", timeout_s=30)
        record = await (await js.key_value(WORKERS_BUCKET)).get(worker_key("llm-1"))
        assert record.value is not None
        assert decode_worker(record.value).slots == TEXT_SLOTS  # no --slots: a batch's default
        events = await collect(await client.submit(chat(max_tokens=3, ignore_eos=True)))
        assert done_of(events).usage.completion_tokens == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(proc.wait, 20)
    assert rc == 0
    lines = log.read_text()
    assert "loaded SmolLM2-135M-Instruct in" in lines
    assert POEM not in lines


def test_llm_models_setting_is_parsed() -> None:
    from headrace.worker import parse_models

    assert parse_models("") == {}
    assert parse_models("a=/m/a.gguf, b = /m/b.gguf") == {
        "a": Path("/m/a.gguf"),
        "b": Path("/m/b.gguf"),
    }
    assert parse_models("/m/Qwen2.5-0.5B.gguf") == {"Qwen2.5-0.5B": Path("/m/Qwen2.5-0.5B.gguf")}
    for bad in ("=/m/a.gguf", "a=", "a=/x,a=/y", "!!=/x"):
        with pytest.raises(ValueError):  # noqa: PT011 - each message differs
            parse_models(bad)
