"""Image generation end to end: the edge's A1111 and OpenAI routes, nats-server, a diffusers
worker on the random-weight tiny-sd pipeline, and the images object store."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from nats.js import JetStreamContext
from PIL import Image

from schemas.client import JobClient
from schemas.events import Done, Progress
from schemas.jobs import ImageJob, ImageParams
from schemas.subjects import IMAGES_BUCKET, new_job_id
from tests.conftest import API_KEY, OTHER_KEY, collect, running
from workers.runtime import Runtime
from workers.settings import WorkerSettings

pytestmark = pytest.mark.slow

ALICE = {"Authorization": f"Bearer {API_KEY}"}
BOB = {"Authorization": f"Bearer {OTHER_KEY}"}
SMALL = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 2}


def engine(tiny_sd: Path, *ids: str) -> Any:
    from workers.engines.diffusion import DiffusionEngine, ImageModelConfig

    return DiffusionEngine(
        [ImageModelConfig(i, str(tiny_sd), device="cpu", threads=1) for i in ids or ("tiny-sd",)]
    )


@pytest.fixture
async def sd_worker(
    worker_settings: WorkerSettings, tiny_sd: Path, js: JetStreamContext
) -> AsyncIterator[Runtime]:
    async with running(worker_settings, engine(tiny_sd)) as runtime:
        yield runtime


@pytest.fixture
async def http(edge: str) -> AsyncIterator[Callable[..., Any]]:
    async with aiohttp.ClientSession(edge) as session:

        def call(method: str, path: str, **kw: Any) -> Any:
            kw.setdefault("headers", ALICE)
            return session.request(method, path, **kw)

        yield call


def png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    assert image.format == "PNG"
    return image


async def txt2img(http: Any, headers: dict[str, str] = ALICE, **body: Any) -> dict[str, Any]:
    async with http("POST", "/sdapi/v1/txt2img", json={**SMALL, **body}, headers=headers) as r:
        payload = await r.json()
        assert r.status == 200, payload
        return dict(payload)


async def sse_events(response: aiohttp.ClientResponse) -> list[tuple[str, Any]]:
    """(event, data) pairs of an SSE response."""
    out, event = [], "message"
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            out.append((event, orjson.loads(line[6:])))
            event = "message"
    return out


async def test_txt2img_returns_pngs_of_the_requested_size_count_and_seeds(
    sd_worker: Runtime, http: Any
) -> None:
    body = await txt2img(http, width=64, height=96, batch_size=2, n_iter=2, seed=1234)
    images = [png(b) for b in body["images"]]
    assert [i.size for i in images] == [(64, 96)] * 4
    info = orjson.loads(body["info"])
    assert info["all_seeds"] == [1234, 1235, 1236, 1237]
    assert info["sd_model_name"] == "tiny-sd"
    assert body["parameters"]["batch_size"] == 2
    # A1111's infotext travels in the PNG, with each image's own seed.
    assert "Seed: 1236" in images[2].info["parameters"]
    assert images[2].info["parameters"] == info["infotexts"][2]
    assert len({i.tobytes() for i in images}) == 4  # four seeds, four different images


async def test_a_fixed_seed_gives_identical_bytes_and_seed_minus_one_is_reported(
    sd_worker: Runtime, http: Any
) -> None:
    first = await txt2img(http, seed=7)
    second = await txt2img(http, seed=7)
    assert first["images"] == second["images"]
    drawn = await txt2img(http, seed=-1)
    seed = orjson.loads(drawn["info"])["seed"]
    assert isinstance(seed, int)
    assert seed >= 0
    again = await txt2img(http, seed=seed)
    assert again["images"] == drawn["images"]  # the reported seed reproduces the image


async def test_img2img_takes_base64_and_data_uris(sd_worker: Runtime, http: Any) -> None:
    source = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(source, format="PNG")
    b64 = base64.b64encode(source.getvalue()).decode()
    for init in (b64, f"data:image/png;base64,{b64}"):
        body = {**SMALL, "steps": 4, "init_images": [init], "denoising_strength": 0.5}
        async with http("POST", "/sdapi/v1/img2img", json=body) as r:
            payload = await r.json()
            assert r.status == 200, payload
        assert png(payload["images"][0]).size == (64, 64)
        assert payload["parameters"]["init_images"] is None
        assert orjson.loads(payload["info"])["denoising_strength"] == 0.5


async def test_progress_streams_monotonically_to_the_total(sd_worker: Runtime, http: Any) -> None:
    headers = {**ALICE, "Accept": "text/event-stream"}
    # A1111's live previews: show_progress_every_n_steps, here per request.
    body = {**SMALL, "steps": 6, "n_iter": 2,
            "override_settings": {"show_progress_every_n_steps": 3}}  # fmt: skip
    async with http("POST", "/sdapi/v1/txt2img", json=body, headers=headers) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = await sse_events(r)
    kinds = [e for e, _ in events]
    assert kinds[-1] == "result"
    assert set(kinds[:-1]) == {"progress"}
    steps = [d["step"] for e, d in events if e == "progress"]
    assert steps == sorted(steps)
    assert steps[-1] == 12
    assert {d["total"] for e, d in events if e == "progress"} == {12}
    previews = [d["current_image"] for e, d in events if e == "progress"]
    assert previews[:2] == [None, None]  # the first preview comes with step 3
    assert all(p is not None for p in previews[2:])
    assert png(previews[2]).size == (8, 8)  # decoded from the 8x8 latents
    assert len(events[-1][1]["images"]) == 2


def image_job(**params: Any) -> ImageJob:
    now_ms = int(time.time() * 1000)
    p = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "seed": 5, **params}
    return ImageJob(
        id=new_job_id(), model="tiny-sd", created_ms=now_ms, deadline_ms=now_ms + 60_000,
        params=ImageParams(**p),
    )  # fmt: skip


async def test_previews_come_with_progress_when_asked(
    sd_worker: Runtime, client: JobClient
) -> None:
    # A1111 has no per-request preview switch; a NATS-native job asks with preview_every.
    stream = await client.submit(image_job(steps=4, preview_every=2))
    events = [r.event for r in await collect(stream)]
    assert isinstance(events[-1], Done)
    previews = [e.preview for e in events if isinstance(e, Progress) and e.preview]
    assert len(previews) == 2
    assert png(previews[0]).size[0] < 64  # decoded from the latents, not the full image


async def test_interrupt_stops_only_the_callers_task(
    worker_settings: WorkerSettings, tiny_sd: Path, js: JetStreamContext, http: Any
) -> None:
    settings = worker_settings.model_copy(update={"slots": 2})
    async with running(settings, engine(tiny_sd)):
        long = {**SMALL, "steps": 60}
        stream_headers = {**ALICE, "Accept": "text/event-stream"}
        async with http("POST", "/sdapi/v1/txt2img", json=long, headers=stream_headers) as a:
            bob = asyncio.create_task(txt2img(http, BOB, **long))
            await a.content.readuntil(b"event: progress")  # alice's job is running
            async with http("GET", "/sdapi/v1/progress") as r:
                progress = await r.json()
            assert progress["state"]["sampling_steps"] == 60
            assert 0 < progress["progress"] < 1
            async with http("POST", "/sdapi/v1/interrupt") as r:
                assert r.status == 200
            events = await sse_events(a)
        result = events[-1]
        assert result[0] == "result"
        assert result[1]["images"] == []
        assert orjson.loads(result[1]["info"])["interrupted"] is True
        # Bob's job (queued behind alice's in the engine) was not touched.
        finished = await asyncio.wait_for(bob, 60)
        assert len(finished["images"]) == 1
        assert orjson.loads(finished["info"])["interrupted"] is False


async def test_options_choose_the_model_per_key(
    worker_settings: WorkerSettings, tiny_sd: Path, js: JetStreamContext, http: Any
) -> None:
    async with running(worker_settings, engine(tiny_sd, "tiny-sd", "tiny-sd-b")):
        async with http("GET", "/sdapi/v1/sd-models") as r:
            titles = [m["title"] for m in await r.json()]
        assert titles == ["tiny-sd", "tiny-sd-b"]
        async with http(
            "POST", "/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sd-b"}
        ) as r:
            assert r.status == 200
        async with http("GET", "/sdapi/v1/options") as r:
            assert (await r.json())["sd_model_checkpoint"] == "tiny-sd-b"
        async with http("GET", "/sdapi/v1/options", headers=BOB) as r:
            assert (await r.json())["sd_model_checkpoint"] == "tiny-sd"
        alice = orjson.loads((await txt2img(http))["info"])
        bob = orjson.loads((await txt2img(http, BOB))["info"])
        assert (alice["sd_model_name"], bob["sd_model_name"]) == ("tiny-sd-b", "tiny-sd")
        body = {"sd_model_checkpoint": "no-such-model"}
        async with http("POST", "/sdapi/v1/options", json=body) as r:
            assert r.status == 404


async def test_large_results_travel_through_the_object_store_intact(
    worker_settings: WorkerSettings, tiny_sd: Path, js: JetStreamContext, http: Any
) -> None:
    async with running(worker_settings, engine(tiny_sd)):
        inline = await txt2img(http, seed=99, batch_size=2)
    stored_settings = worker_settings.model_copy(update={"image_inline_chars": 0})
    async with running(stored_settings, engine(tiny_sd)):
        stored = await txt2img(http, seed=99, batch_size=2)
    assert stored["images"] == inline["images"]
    names = [o.name async for o in _objects(js)]
    assert len(names) == 2
    assert all(n.endswith(".png") for n in names)


async def _objects(js: JetStreamContext) -> AsyncIterator[Any]:
    store = await js.object_store(IMAGES_BUCKET)
    for info in await store.list():
        yield info


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/sdapi/v1/txt2img", {"width": 65}, "width"),
        ("/sdapi/v1/txt2img", {"width": 4096}, "width"),
        ("/sdapi/v1/txt2img", {"steps": 0}, "steps"),
        ("/sdapi/v1/txt2img", {"steps": 151}, "steps"),
        ("/sdapi/v1/txt2img", {"sampler_name": "Euler z"}, "sampler_name"),
        ("/sdapi/v1/txt2img", {"sampler_name": "DDIM", "scheduler": "Karras"}, "scheduler"),
        ("/sdapi/v1/txt2img", {"enable_hr": True}, "enable_hr"),
        ("/sdapi/v1/img2img", {"init_images": ["not base64!"]}, "init_images"),
        ("/sdapi/v1/img2img", {"init_images": [base64.b64encode(b"text").decode()]}, "init_images"),
        ("/sdapi/v1/img2img", {"init_images": ["https://example.com/a.png"]}, "init_images"),
        ("/sdapi/v1/img2img", {"init_images": []}, "init_images"),
        ("/sdapi/v1/img2img", {"init_images": ["iVBORw0KGgo="], "mask": "x"}, "mask"),
        ("/v1/images/generations", {"size": "65x64"}, "size"),
        ("/v1/images/generations", {"response_format": "url"}, "response_format"),
        ("/v1/images/generations", {"n": 17}, "n"),
    ],
)
async def test_invalid_image_requests_are_400s_naming_the_field(
    sd_worker: Runtime, http: Any, path: str, body: dict[str, Any], param: str
) -> None:
    async with http("POST", path, json={**SMALL, **body}) as r:
        payload = await r.json()
    assert r.status == 400, payload
    assert payload["error"]["param"] == param
    assert payload["error"]["type"] == "invalid_request_error"
    if param == "sampler_name":
        assert "DPM++ 2M Karras" in payload["error"]["message"]  # the known names are listed


async def test_openai_images_with_the_official_sdk(sd_worker: Runtime, oai: Any) -> None:
    result = await oai.images.generate(
        model="tiny-sd", prompt="a lighthouse", n=2, size="64x64",
        response_format="b64_json", extra_body={"steps": 2, "seed": 3},
    )  # fmt: skip
    assert [png(d.b64_json).size for d in result.data] == [(64, 64), (64, 64)]
    assert result.data[0].b64_json != result.data[1].b64_json


async def test_job_events_stream_progress_then_the_images(
    worker_settings: WorkerSettings, tiny_sd: Path, js: JetStreamContext, http: Any
) -> None:
    settings = worker_settings.model_copy(update={"image_inline_chars": 0})
    async with running(settings, engine(tiny_sd)):
        async with http("POST", "/sdapi/v1/txt2img", json={**SMALL, "steps": 3}) as r:
            job_id = r.headers["x-headrace-job-ids"]
            direct = (await r.json())["images"]
        async with http("GET", f"/v1/jobs/{job_id}/events") as r:
            events = await sse_events(r)
        async with http("GET", f"/v1/jobs/{job_id}/events", headers=BOB) as r:
            assert r.status == 404  # another key's job
    types = [d["type"] for _, d in events]
    assert types == ["started", "progress", "progress", "progress", "done", "end"]
    (image,) = events[-2][1]["images"]
    assert image.get("object") is None
    assert image["b64_png"] == direct[0]


async def test_progress_of_a_finished_task_by_id(sd_worker: Runtime, http: Any) -> None:
    async with http("POST", "/sdapi/v1/txt2img", json=SMALL) as r:
        job_id = r.headers["x-headrace-job-ids"]
    async with http("GET", f"/sdapi/v1/progress?id_task={job_id}") as r:
        assert (await r.json())["progress"] == 1.0
    async with http("GET", f"/sdapi/v1/progress?id_task={job_id}", headers=BOB) as r:
        assert (await r.json())["progress"] == 0.0  # not bob's: as if it did not exist
    async with http("GET", "/sdapi/v1/samplers") as r:
        assert "Euler a" in [s["name"] for s in await r.json()]


async def test_image_requests_are_charged_megapixel_steps(
    worker_settings: WorkerSettings, tiny_sd: Path, js: JetStreamContext, valkey: Any,
    nats_server: Any, tmp_path: Path,
) -> None:  # fmt: skip
    from prometheus_client import CollectorRegistry

    from edge.app import start
    from edge.auth import digest
    from edge.settings import EdgeSettings
    from headrace.servers import free_port

    # 64x64 x 10 steps = 0.04 megapixel-steps, charged as 1: a budget of 2 admits two requests.
    sha = digest("sk-painter").hex()
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[[keys]]\nname = "painter"\nsha256 = "{sha}"\nimage_budget = 2\n')
    port = free_port()
    settings = EdgeSettings(
        nats_url=nats_server.url,
        **nats_server.login("edge"),
        port=port,
        api_keys="",
        keys_file=keys,
        redis_url=valkey.url,
    )
    runner = await start(settings, CollectorRegistry())
    headers = {"Authorization": "Bearer sk-painter"}
    try:
        async with (
            running(worker_settings, engine(tiny_sd)),
            aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http,
        ):
            statuses = []
            for _ in range(3):
                body = {**SMALL, "steps": 10}
                async with http.post("/sdapi/v1/txt2img", json=body, headers=headers) as r:
                    statuses.append(r.status)
                    payload = await r.json()
            assert statuses == [200, 200, 429]
            assert "megapixel-steps per minute" in payload["error"]["message"]
            assert int(r.headers["Retry-After"]) >= 1
    finally:
        await runner.cleanup()


async def test_worker_and_edge_count_images_steps_and_queue_time(
    sd_worker: Runtime, http: Any, edge: str
) -> None:
    from prometheus_client import generate_latest

    await txt2img(http, steps=3, batch_size=2)
    await txt2img(http, steps=2)
    done = 'headrace_worker_jobs_total{model="tiny-sd",outcome="done"} 2.0'
    for _ in range(500):  # counted once the worker's ack is confirmed, after `done` is out
        if done in generate_latest(sd_worker.metrics.registry).decode():
            break
        await asyncio.sleep(0.01)
    worker = generate_latest(sd_worker.metrics.registry).decode()
    assert 'headrace_worker_images_total{model="tiny-sd"} 3.0' in worker
    assert 'headrace_worker_steps_total{model="tiny-sd"} 5.0' in worker
    assert 'headrace_worker_step_seconds_count{model="tiny-sd"} 2.0' in worker
    assert 'headrace_worker_jobs_total{model="tiny-sd",outcome="done"} 2.0' in worker
    async with http("GET", "/metrics") as r:
        metrics = await r.text()
    assert 'headrace_edge_queue_seconds_count{model="tiny-sd"} 2.0' in metrics
    assert 'headrace_edge_request_seconds_count{model="tiny-sd"} 2.0' in metrics


async def test_a_large_init_image_goes_through_the_object_store(
    sd_worker: Runtime, http: Any, js: JetStreamContext
) -> None:
    noise = Image.frombytes("RGB", (512, 512), os.urandom(512 * 512 * 3))
    source = io.BytesIO()
    noise.save(source, format="PNG")  # about 790 KB: too large to travel inline
    body = {**SMALL, "init_images": [base64.b64encode(source.getvalue()).decode()]}
    # A stream, not bytes: aiohttp warns that a body this large sent at once blocks its loop.
    data = io.BytesIO(orjson.dumps(body))
    headers = {**ALICE, "Content-Type": "application/json"}
    async with http("POST", "/sdapi/v1/img2img", data=data, headers=headers) as r:
        payload = await r.json()
        assert r.status == 200, payload
        job_id = r.headers["x-headrace-job-ids"]
    assert png(payload["images"][0]).size == (64, 64)
    names = [o.name async for o in _objects(js)]
    assert names == [f"{job_id}/input-0"]


async def test_a_job_naming_a_missing_object_fails_without_retries(
    sd_worker: Runtime, client: JobClient
) -> None:
    from schemas.events import Error
    from schemas.jobs import ImageInput

    job = image_job(init_images=[ImageInput(object="gone/input-0")])
    events = [r.event for r in await collect(await client.submit(job))]
    assert isinstance(events[-1], Error)
    assert events[-1].code == "invalid_request_error"
    assert "does not exist" in events[-1].message
    assert sum(isinstance(e, Error) for e in events) == 1  # terminated, not redelivered


async def test_a_client_that_goes_away_cancels_its_image_job(
    sd_worker: Runtime, edge: str, client: JobClient
) -> None:
    from tests.conftest import finished_history

    headers = {**ALICE, "Accept": "text/event-stream"}
    body = {**SMALL, "steps": 150}
    async with aiohttp.ClientSession() as session:
        r = await session.post(f"{edge}/sdapi/v1/txt2img", json=body, headers=headers)
        job_id = r.headers["x-headrace-job-ids"]
        await r.content.readuntil(b"event: progress")  # running
        r.close()  # the client goes away mid-generation
    history = await finished_history(client, job_id, timeout_s=20)
    done = history[-1].event
    assert isinstance(done, Done)
    assert done.finish_reason == "cancelled"
    steps = [r.event.step for r in history if isinstance(r.event, Progress)]
    assert steps[-1] < 150  # stopped between two steps, long before the end
