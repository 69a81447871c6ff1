"""Embeddings of the real SmolLM2 through client, edge, nats-server and a llama.cpp worker,
compared with what llama-cpp-python itself computes for the same text."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from tests.conftest import API_KEY, running
from tests.llmunity import embeddings_content, embeddings_request
from workers.settings import WorkerSettings

pytest.importorskip("llama_cpp", reason="the llm extra is not installed (make install-llm)")
import llama_cpp

from schemas.events import Done, Embeddings
from schemas.jobs import EmbedJob, EmbedParams
from workers.engines import embed
from workers.engines.gguf import DEFAULT_MODEL_ID, ModelConfig, bundled_gguf
from workers.engines.llama import LlamaEngine

ollama = pytest.importorskip("ollama")

MODEL = DEFAULT_MODEL_ID
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TEXTS = [
    "The lighthouse keeper counted the ships.",
    "Rain fell on the quiet harbour all night.",
    "A red fox crossed the frozen river.",
    "Tea, bread and a little honey.",
    "The lighthouse keeper counted the ships.",
]
TOLERANCE = 1e-5  # float32 rounding of the same computation


def config(**extra: Any) -> ModelConfig:
    # Flash attention named, not left to llama.cpp (its "auto" turns it on for the CPU): the
    # reference below must run the same kernels, and vectors with and without it differ by ~1e-3.
    return ModelConfig(
        **{"id": MODEL, "path": bundled_gguf(), "n_ctx": 512, "n_threads": 1,
           "flash_attn": True, **extra}
    )  # fmt: skip


@pytest.fixture(scope="module")
def engine() -> LlamaEngine:
    """One engine for the module; each runtime start()s and close()s it."""
    return LlamaEngine([config()])


@dataclass
class Reference:
    n_embd: int
    batched: list[list[float]]
    alone: list[list[float]]
    tokens: list[list[int]]


@pytest.fixture(scope="module")
def reference() -> Iterator[Reference]:
    """llama-cpp-python's own embeddings of TEXTS (mean pooling, L2-normalized), all in one
    batch, and of the first two one at a time; and its tokens of each text."""
    llm = llama_cpp.Llama(
        model_path=str(bundled_gguf()),
        embedding=True,
        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,  # SmolLM2's GGUF names no pooling
        flash_attn=True,
        n_ctx=512,
        n_threads=1,
        verbose=False,
    )
    try:
        yield Reference(
            n_embd=llm.n_embd(),
            batched=llm.embed(TEXTS, normalize=True),
            alone=[llm.embed(t, normalize=True) for t in TEXTS[:2]],
            tokens=[llm.tokenize(t.encode(), add_bos=True, special=True) for t in TEXTS],
        )
    finally:
        llm.close()


def close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b, strict=True)) < TOLERANCE


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))  # both are unit vectors


async def test_openai_sdk_vectors_are_llama_cpp_pythons(
    oai: openai.AsyncOpenAI,
    worker_settings: WorkerSettings,
    engine: LlamaEngine,
    reference: Reference,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    n_embd, expected, alone = reference.n_embd, reference.batched, reference.alone
    evaluations: list[int] = []
    real = embed.Embedder.evaluate

    def counted(self: embed.Embedder, inputs: Any, norm: int) -> list[str]:
        evaluations.append(len(inputs))
        return real(self, inputs, norm)

    monkeypatch.setattr(embed.Embedder, "evaluate", counted)  # a spy: the real call runs
    async with running(worker_settings, engine):
        floats = await oai.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
        default = await oai.embeddings.create(model=MODEL, input=TEXTS)  # base64, SDK-decoded
        singles = [await oai.embeddings.create(model=MODEL, input=t) for t in TEXTS[:2]]
    got = [d.embedding for d in floats.data]
    assert n_embd == 576
    assert all(len(v) == n_embd for v in got)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-5 for v in got)
    for mine, theirs in zip(got, expected, strict=True):
        assert close(mine, theirs)
    assert not close(got[0], got[1])  # different texts, different vectors
    assert [d.embedding for d in default.data] == got
    # Alone, each is llama-cpp-python's vector alone. Batched or alone, the same vector up to
    # llama.cpp's own numerics: its matrix kernels depend on the batch's size (measured in
    # llama-cpp-python itself: up to 1e-3 apart, cosine 0.99999), so both compare to theirs.
    for single, theirs, batched in zip(singles, alone, got, strict=False):
        assert close(single.data[0].embedding, theirs)
        assert cosine(single.data[0].embedding, batched) > 0.9999
    assert evaluations[0] == len(TEXTS)  # five inputs, one llama_decode
    tokens = sum(len(t) for t in reference.tokens)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == tokens


async def test_token_ids_ollama_and_llmunity_agree(
    edge: str,
    worker_settings: WorkerSettings,
    engine: LlamaEngine,
    reference: Reference,
) -> None:
    expected = reference.batched
    client = ollama.AsyncClient(host=edge, headers=AUTH)
    async with running(worker_settings, engine), aiohttp.ClientSession(headers=AUTH) as http:
        ids = reference.tokens[2]
        async with http.post(f"{edge}/v1/embeddings", json={"model": MODEL, "input": ids}) as r:
            by_ids = (await r.json())["data"][0]["embedding"]
        embedded = await client.embed(model=MODEL, input=TEXTS[2:4])
        legacy = await client.embeddings(model=MODEL, prompt=TEXTS[2])
        async with http.post(
            f"{edge}/embeddings",
            data=orjson.dumps(embeddings_request(TEXTS[2])),
            headers={"Content-Type": "application/json"},
        ) as r:
            llmunity = embeddings_content(await r.text())
    await client.close()
    assert close(by_ids, expected[2])
    assert close(list(embedded.embeddings[0]), expected[2])
    assert close(list(embedded.embeddings[1]), expected[3])
    assert embedded.prompt_eval_count == len(ids) + len(reference.tokens[3])
    raw = list(legacy.embedding)  # Ollama's old route: the pooled vector, not normalized
    length = math.sqrt(sum(x * x for x in raw))
    assert abs(length - 1) > 1e-3
    assert close([x / length for x in raw], expected[2])
    assert close(llmunity, expected[2])


async def test_an_input_over_the_context_is_a_400(
    oai: openai.AsyncOpenAI, worker_settings: WorkerSettings, engine: LlamaEngine
) -> None:
    async with running(worker_settings, engine):
        with pytest.raises(openai.BadRequestError) as e:
            await oai.embeddings.create(model=MODEL, input=["short", "word " * 600])
        with pytest.raises(openai.BadRequestError) as vocab:
            await oai.embeddings.create(model=MODEL, input=[[1, 2, 10_000_000]])
        ok = await oai.embeddings.create(model=MODEL, input="still serving")
    assert e.value.code == "context_length_exceeded"
    assert e.value.param == "input"
    assert "input 1" in e.value.message
    assert vocab.value.param == "input"
    assert "outside the vocabulary" in vocab.value.message
    assert len(ok.data[0].embedding) == 576


async def test_an_embedding_only_model_drops_in_by_config(
    oai: openai.AsyncOpenAI,
    worker_settings: WorkerSettings,
    reference: Reference,
) -> None:
    expected = reference.batched
    only = LlamaEngine([config(embedding_only=True)])
    async with running(worker_settings, only):
        listed = await oai.models.retrieve(MODEL)
        vectors = await oai.embeddings.create(model=MODEL, input=TEXTS[:2])
        with pytest.raises(openai.BadRequestError) as e:
            await oai.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
    assert listed.context_length == 512  # type: ignore[attr-defined]
    assert close(vectors.data[0].embedding, expected[0])
    assert close(vectors.data[1].embedding, expected[1])
    assert e.value.param == "model"
    assert "embeddings only" in e.value.message


def test_pooling_comes_from_the_gguf_else_mean() -> None:
    mean, cls = llama_cpp.LLAMA_POOLING_TYPE_MEAN, llama_cpp.LLAMA_POOLING_TYPE_CLS
    assert embed.model_pooling({"general.architecture": "llama"}) == mean
    assert embed.model_pooling({"general.architecture": "bert", "bert.pooling_type": "2"}) == cls
    assert embed.model_pooling({"general.architecture": "bert", "bert.pooling_type": "0"}) == mean
    assert embed.model_pooling({"general.architecture": "bert"}, "last") == (
        llama_cpp.LLAMA_POOLING_TYPE_LAST
    )


def test_batches_pack_inputs_by_tokens_and_sequences() -> None:
    assert embed.pack([100, 200, 300], 0, 512) == 2  # 100 + 200 fit, + 300 does not
    assert embed.pack([100, 200, 300], 2, 512) == 3
    assert embed.pack([600], 0, 512) == 1  # one input always makes progress
    assert embed.pack([1] * 100, 0, 512) == embed.MAX_SEQUENCES


def test_embedding_models_are_configured_beside_text_models(
    worker_settings: WorkerSettings,
) -> None:
    from headrace.worker import llama_engine

    path = str(bundled_gguf())
    settings = worker_settings.model_copy(
        update={"llm_models": f"chat={path}", "llm_embedding_models": f"vec={path}", "slots": 2}
    )
    configs = llama_engine(settings).configs
    assert configs["chat"].embeddings
    assert not configs["chat"].embedding_only
    assert configs["chat"].contexts == 2
    assert configs["vec"].embedding_only
    assert configs["vec"].contexts == 1
    only = llama_engine(worker_settings.model_copy(update={"llm_embedding_models": f"vec={path}"}))
    assert list(only.configs) == ["vec"]  # no bundled chat model added beside it
    off = llama_engine(worker_settings.model_copy(update={"llm_embeddings": False}))
    assert not off.configs[MODEL].embeddings
    with pytest.raises(ValueError, match="twice"):
        llama_engine(settings.model_copy(update={"llm_embedding_models": f"chat={path}"}))


async def test_a_model_with_embeddings_off_says_so(
    oai: openai.AsyncOpenAI, worker_settings: WorkerSettings
) -> None:
    async with running(worker_settings, LlamaEngine([config(embeddings=False)])):
        with pytest.raises(openai.BadRequestError) as e:
            await oai.embeddings.create(model=MODEL, input="hello")
        chat = await oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert e.value.param == "model"
    assert "does not compute embeddings" in e.value.message
    assert chat.usage is not None
    assert chat.usage.completion_tokens == 2


async def test_many_inputs_are_several_batches_and_events_of_bounded_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(embed, "EVENT_BYTES", 16 * 4 * 576)  # 16 vectors an event, not 227
    engine = LlamaEngine([config(n_ctx=64)])  # batches of at most 64 tokens
    await engine.start()
    texts = [f"n{i}" for i in range(40)]  # about 120 tokens
    job = EmbedJob(id="e" * 16, model=MODEL, created_ms=0, params=EmbedParams(inputs=texts))
    events = []
    batches: list[int] = []
    real = embed.Embedder.evaluate

    def counted(self: embed.Embedder, inputs: Any, norm: int) -> list[str]:
        batches.append(sum(len(i) for i in inputs))
        return real(self, inputs, norm)

    monkeypatch.setattr(embed.Embedder, "evaluate", counted)
    try:
        async for event in engine.embed(job, threading.Event()):
            events.append(event)
    finally:
        await engine.close()
    pieces = [e for e in events if isinstance(e, Embeddings)]
    assert len(batches) >= 2
    assert all(n <= 64 for n in batches)
    assert [p.index for p in pieces] == [0, 16, 32]
    assert [len(p.vectors) for p in pieces] == [16, 16, 8]
    assert isinstance(events[-1], Done)
    assert events[-1].usage.prompt_tokens == sum(batches)
