"""LLMUnity's remote mode against the edge: a streamed ``/completion`` read exactly as it reads it."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import API_KEY, running
from tests.llmunity import convert_content, multi_chat_content
from workers.engines.echo import EchoEngine
from workers.settings import WorkerSettings

AUTH = {"Authorization": f"Bearer {API_KEY}"}
# What LLMCharacter posts in remote mode (its ChatRequest), less the fields it leaves default.
BODY: dict[str, Any] = {"prompt": "one two three four five six", "n_predict": 6, "seed": 7}


async def streamed(edge: str, body: dict[str, Any]) -> tuple[bytes, list[str], Any]:
    """The whole body, every partial body as LLMUnity's download saw it, and the headers."""
    partial, seen = b"", []
    async with (
        aiohttp.ClientSession(headers=AUTH) as http,
        http.post(f"{edge}/completion", json={**body, "stream": True}) as resp,
    ):
        assert resp.status == 200
        async for piece in resp.content.iter_any():
            partial += piece
            seen.append(partial.decode())
        return partial, seen, resp.headers


def test_the_parser_rejects_what_broke_llmunity() -> None:
    good = 'data: {"content": "a", "stop": false}\n\ndata: {"content": "b", "stop": true}\n\n'
    assert multi_chat_content(good) == "ab"
    with pytest.raises(json.JSONDecodeError):
        convert_content('id: 1-2\ndata: {"content": "a", "stop": false}\n\n')
    with pytest.raises(json.JSONDecodeError):
        convert_content(': keep-alive\ndata: {"content": "a", "stop": false}\n\n')
    with pytest.raises(json.JSONDecodeError):  # a keep-alive between two events
        convert_content('data: {"content": "a"}\n\n: keep-alive\ndata: {"content": "b"}\n\n')


async def test_llmunity_parses_a_slow_stream_whole_and_while_it_arrives(
    edge: str, worker_settings: WorkerSettings
) -> None:
    # Tokens slower than the edge's keep-alive interval (0.2 s in tests): every gap is one
    # where the OpenAI routes send ``: keep-alive``.
    async with running(worker_settings, EchoEngine(token_delay_s=0.3)):
        async with (
            aiohttp.ClientSession(headers=AUTH) as http,
            http.post(f"{edge}/completion", json=BODY) as resp,
        ):
            whole = (await resp.json())["content"]
        raw, partials, headers = await streamed(edge, BODY)
    assert headers["Content-Type"].startswith("text/event-stream")
    events = raw.decode().split("\n\n")
    assert events[-1] == ""  # the body ends with a complete event
    assert all(e.startswith("data: ") and "\n" not in e for e in events[:-1])
    chunks = convert_content(raw.decode())
    assert [c["stop"] for c in chunks] == [False] * 6 + [True]
    assert multi_chat_content(raw.decode()) == whole.strip()
    # LLMUnity parses the partial body every frame while downloading: each must parse too.
    assert len(partials) > 1
    for partial in partials:
        assert isinstance(convert_content(partial), list)


async def test_a_completion_stream_stays_resumable(
    edge: str, worker_settings: WorkerSettings
) -> None:
    async with running(worker_settings):
        raw, _, headers = await streamed(edge, BODY)
        job_id = headers["x-headrace-job-ids"]
        resume = {**AUTH, "Last-Event-ID": "1-3"}
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{edge}/v1/jobs/{job_id}/events", headers=resume) as resp,
        ):
            replay = (await resp.read()).decode()
    assert b"id:" not in raw
    ids = [line[4:] for line in replay.split("\n") if line.startswith("id: ")]
    assert ids[0] == "1-4"  # after the event the client saw last
    texts = [
        orjson.loads(line[6:]).get("text")
        for line in replay.split("\n")
        if line.startswith("data: ")
    ]
    assert "".join(t for t in texts if t) in "".join(
        c["content"] for c in convert_content(raw.decode())
    )
