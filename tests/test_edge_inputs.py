"""Bad inputs through the real edge: each gets a 4xx in its API's error shape, never a 500."""

from __future__ import annotations

import base64
from typing import Any

import aiohttp
import orjson
import pytest
from pydantic import ValidationError

from schemas.jobs import MAX_SCHEMA_DEPTH, TextParams
from tests.conftest import API_KEY, huge_png, running
from workers.settings import WorkerSettings

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = [{"role": "user", "content": "the quick brown fox"}]


async def post_raw(
    edge: str, path: str, data: bytes, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """POST bytes as they are; returns the status and the JSON body."""
    hdrs = {**AUTH, "Content-Type": "application/json", **(headers or {})}
    async with (
        aiohttp.ClientSession() as http,
        http.post(edge + path, data=data, headers=hdrs) as r,
    ):
        return r.status, orjson.loads(await r.read())


def nested_schema(levels: int) -> bytes:
    """A JSON schema of ``levels`` objects inside each other (2 * levels + 1 JSON levels), as
    text: neither orjson nor json writes the deepest ones."""
    return b'{"type":"object","properties":{"a":' * levels + b'{"type":"string"}' + b"}}" * levels


def with_schema(body: dict[str, Any], levels: int) -> bytes:
    """``body`` with its ``"SCHEMA"`` placeholder replaced by a nested schema."""
    return orjson.dumps(body).replace(b'"SCHEMA"', nested_schema(levels))


def chat_with_schema(levels: int) -> bytes:
    fmt = {"type": "json_schema", "json_schema": {"name": "deep", "schema": "SCHEMA"}}
    return with_schema(
        {"model": "echo", "messages": CHAT, "max_tokens": 2, "response_format": fmt}, levels
    )


async def test_a_schema_within_the_bound_is_served(
    edge: str, worker_settings: WorkerSettings
) -> None:
    async with running(worker_settings):
        status, body = await post_raw(edge, "/v1/chat/completions", chat_with_schema(20))
    assert status == 200, body


@pytest.mark.parametrize(
    ("levels", "param"),
    [
        (MAX_SCHEMA_DEPTH // 2, "response_format.json_schema.schema"),  # 65 JSON levels
        (
            126,
            "response_format",
        ),  # the body's own bound: 253 levels, past orjson's 254 with the job
        (600, None),  # past orjson's 1024 levels: not even read
    ],
)
async def test_a_deep_openai_schema_is_a_400_naming_it(
    edge: str, levels: int, param: str | None
) -> None:
    status, body = await post_raw(edge, "/v1/chat/completions", chat_with_schema(levels))
    assert status == 400
    assert body["error"]["param"] == param
    assert body["error"]["type"] == "invalid_request_error"
    assert "levels" in body["error"]["message"]


async def test_a_deep_ollama_format_is_a_400_in_ollamas_shape(edge: str) -> None:
    raw = with_schema({"model": "echo", "messages": CHAT, "format": "SCHEMA"}, 40)
    status, body = await post_raw(edge, "/api/chat", raw)
    assert status == 400
    assert set(body) == {"error"}
    assert "'format'" in body["error"]
    assert f"at most {MAX_SCHEMA_DEPTH} levels" in body["error"]


async def test_a_deep_llamacpp_json_schema_is_a_400_naming_it(edge: str) -> None:
    raw = with_schema({"prompt": "a b", "n_predict": 2, "json_schema": "SCHEMA"}, 40)
    status, body = await post_raw(edge, "/completion", raw)
    assert status == 400
    assert body["error"]["param"] == "json_schema"


async def test_a_deep_value_anywhere_in_a_body_is_a_400(edge: str) -> None:
    # override_settings is stored and echoed back: past the bound it would fail later, as a 500.
    deep = b'{"override_settings": {"x": ' + b"[" * 200 + b"]" * 200 + b"}}"
    status, body = await post_raw(edge, "/sdapi/v1/txt2img", deep)
    assert status == 400
    assert body["error"]["param"] == "override_settings"


def test_a_job_with_a_deep_schema_is_invalid() -> None:
    """NATS-native producers skip the edge: a worker finds the same bound in the contract."""
    schema = orjson.loads(nested_schema(MAX_SCHEMA_DEPTH // 2))
    with pytest.raises(ValidationError, match="at most 64 levels"):
        TextParams(prompt="x", seed=1, json_schema=schema)
    TextParams(
        prompt="x", seed=1, json_schema=orjson.loads(nested_schema(MAX_SCHEMA_DEPTH // 2 - 1))
    )


CHAT_BODY = orjson.dumps({"model": "echo", "messages": CHAT, "max_tokens": 2})


@pytest.mark.parametrize("header", ["Timeout", "X-Stainless-Timeout"])
@pytest.mark.parametrize("value", ["nan", "-5", "1e400", "inf", "-inf", "soon", ""])
async def test_a_malformed_timeout_header_is_a_400_naming_it(
    edge: str, header: str, value: str
) -> None:
    status, body = await post_raw(edge, "/v1/chat/completions", CHAT_BODY, {header: value})
    assert status == 400
    assert body["error"]["param"] == header


async def test_a_zero_timeout_is_refused_but_the_node_sdks_zero_means_under_a_second(
    edge: str, worker_settings: WorkerSettings
) -> None:
    status, _ = await post_raw(edge, "/v1/chat/completions", CHAT_BODY, {"Timeout": "0"})
    assert status == 400
    async with running(worker_settings):
        for headers in ({"X-Stainless-Timeout": "0"}, {"Timeout": "2.5"}):
            status, body = await post_raw(edge, "/v1/chat/completions", CHAT_BODY, headers)
            assert status == 200, body


async def test_a_malformed_timeout_is_a_400_in_ollamas_shape(edge: str) -> None:
    raw = orjson.dumps({"model": "echo", "prompt": "hi", "stream": False})
    status, body = await post_raw(edge, "/api/generate", raw, {"Timeout": "nan"})
    assert status == 400
    assert set(body) == {"error"}
    assert "Timeout" in body["error"]


@pytest.mark.parametrize(
    "ctype",
    [
        "text/plain",
        "text/plain; charset=utf-8",
        "multipart/form-data; boundary=x",
        "application/xml",
    ],
)
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", CHAT_BODY),
        ("/api/generate", b'{"model": "echo", "prompt": "hi"}'),
        ("/tokenize", b'{"content": "hi"}'),
    ],
)
async def test_a_body_not_declared_json_is_a_415_in_the_routes_shape(
    edge: str, ctype: str, path: str, body: bytes
) -> None:
    status, answer = await post_raw(edge, path, body, {"Content-Type": ctype})
    assert status == 415
    message = answer["error"] if path.startswith("/api/") else answer["error"]["message"]
    assert "must be JSON" in message
    if path.startswith("/v1/"):
        assert answer["error"]["code"] == "unsupported_media_type"
    elif not path.startswith("/api/"):  # llama.cpp's shape: the status as the code
        assert answer["error"]["code"] == 415


@pytest.mark.parametrize(
    "ctype",
    ["application/json", "application/json; charset=utf-8", "Application/JSON", "application/vnd.api+json",
     "application/x-www-form-urlencoded", None],  # None: no Content-Type at all
)  # fmt: skip
async def test_json_curl_and_undeclared_bodies_are_read_as_json(
    edge: str, worker_settings: WorkerSettings, ctype: str | None
) -> None:
    async with running(worker_settings), aiohttp.ClientSession() as http:
        # aiohttp adds application/octet-stream to bytes unless a Content-Type is given:
        # skip_auto_headers leaves the header out for the None case.
        headers = AUTH if ctype is None else {**AUTH, "Content-Type": ctype}
        async with http.post(
            f"{edge}/v1/chat/completions",
            data=CHAT_BODY,
            headers=headers,
            skip_auto_headers=["Content-Type"],
        ) as r:
            assert r.status == 200, await r.text()
            assert "Content-Type" in r.request_info.headers or ctype is None


async def test_an_empty_post_needs_no_content_type(
    edge: str, worker_settings: WorkerSettings
) -> None:
    async with (
        running(worker_settings),
        aiohttp.ClientSession() as http,
        http.post(f"{edge}/template", headers={**AUTH, "Content-Type": "text/plain"}) as r,
    ):
        assert r.status == 200, await r.text()


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"model": "echo", "messages": CHAT, "stream": "yes"}, "stream"),
        ("/v1/chat/completions", {"model": "echo", "messages": CHAT, "logprobs": 1}, "logprobs"),
        ("/v1/completions", {"model": "echo", "prompt": "hi", "echo": "false"}, "echo"),
        ("/api/chat", {"model": "echo", "messages": CHAT, "stream": "true"}, "stream"),
        ("/api/generate", {"model": "echo", "prompt": "hi", "raw": 0}, "raw"),
        (
            "/v1/chat/completions",
            {"model": "echo", "messages": CHAT, "ignore_eos": 1},
            "ignore_eos",
        ),
        ("/api/show", {"model": "echo", "verbose": "true"}, "verbose"),
        ("/completion", {"prompt": "hi", "stream": "yes"}, "stream"),
        ("/completion", {"prompt": "hi", "logit_bias": {"5": "false"}}, "logit_bias"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "enable_hr": "no"}, "enable_hr"),
    ],
)
async def test_a_boolean_that_is_not_true_or_false_is_a_400(
    edge: str, path: str, body: dict[str, Any], param: str
) -> None:
    status, answer = await post_raw(edge, path, orjson.dumps(body))
    assert status == 400
    error = answer["error"]
    assert param in (error if isinstance(error, str) else error["param"])


@pytest.mark.parametrize("stream", [True, False])
async def test_true_and_false_still_work(
    edge: str, worker_settings: WorkerSettings, stream: bool
) -> None:
    routes = (
        ("/v1/chat/completions", {"model": "echo", "messages": CHAT, "max_tokens": 2}, "text/event-stream"),
        ("/api/generate", {"model": "echo", "prompt": "hi", "options": {"num_predict": 2}}, "application/x-ndjson"),
        ("/completion", {"prompt": "hi", "n_predict": 2}, "text/event-stream"),
    )  # fmt: skip
    async with running(worker_settings), aiohttp.ClientSession() as http:
        for path, body, streamed in routes:
            async with http.post(edge + path, json={**body, "stream": stream}, headers=AUTH) as r:
                assert r.status == 200, await r.text()
                assert r.content_type == (streamed if stream else "application/json")


async def test_a_long_id_task_is_a_400_in_the_error_shape(edge: str) -> None:
    async with aiohttp.ClientSession() as http:
        for length, status in ((128, 200), (129, 400), (10_000, 400), (60_000, 400)):
            url = f"{edge}/sdapi/v1/progress?id_task={'x' * length}"
            async with http.get(url, headers=AUTH) as r:
                assert r.status == status
                assert r.content_type == "application/json"
                if status == 400:
                    assert (await r.json())["error"]["param"] == "id_task"


async def test_long_urls_reach_the_routes_and_their_error_shapes(edge: str) -> None:
    """Up to HEADRACE_MAX_URL_BYTES the route answers (404 here, in OpenAI's shape); past it
    aiohttp's parser does, in plain text, and closes the connection."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{edge}/v1/jobs/{'j' * 20_000}/events", headers=AUTH) as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "job_not_found"
        async with http.get(f"{edge}/nowhere?q={'q' * 70_000}", headers=AUTH) as r:
            assert r.status == 400
            assert r.content_type == "text/plain"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize("uri", [False, True])
async def test_an_init_image_past_the_pixel_budget_is_a_400_before_decoding(
    edge: str, uri: bool
) -> None:
    image = b64(huge_png())  # 17 KB declaring 12 000 x 12 000 pixels
    value = f"data:image/png;base64,{image}" if uri else image
    body = {"prompt": "x", "width": 64, "height": 64, "steps": 1, "init_images": [value]}
    status, answer = await post_raw(edge, "/sdapi/v1/img2img", orjson.dumps(body))
    assert status == 400
    assert answer["error"]["param"] == "init_images"
    assert "12000 x 12000 pixels" in answer["error"]["message"]


async def test_an_init_image_within_the_budget_passes_the_edge(edge: str) -> None:
    image = b64(huge_png(4096, 4096))  # exactly the default budget
    body = {"prompt": "x", "width": 64, "height": 64, "steps": 1, "init_images": [image]}
    status, answer = await post_raw(edge, "/sdapi/v1/img2img", orjson.dumps(body))
    assert status == 503, answer  # past the edge's checks: no image worker runs here
    assert answer["error"]["code"] == "no_worker"
