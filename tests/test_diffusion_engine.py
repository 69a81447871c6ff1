"""The diffusion engine in process (no NATS), on the tiny random-weight SD pipeline."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from PIL import Image

from headrace.tiny_sd import build_tiny_sd
from schemas.errors import InvalidRequest, ModelNotFound
from schemas.events import Done, ImageRef, Progress
from schemas.fleet import ModelInfo
from schemas.infotext import infotext
from schemas.jobs import ImageJob, ImageParams
from schemas.samplers import SAMPLERS
from schemas.subjects import new_job_id
from tests.conftest import huge_png
from workers.engines.abilities import AnswersRpc, ReportsGpuMemory
from workers.engines.diffusion import DiffusionEngine, ImageModelConfig

MODEL = "tiny"
WIDTH, HEIGHT = 64, 48  # not square, so swapped sides would show


def _in_own_loop(coro: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine to its end on a fresh loop in another thread (leaves pytest-asyncio's alone)."""
    with ThreadPoolExecutor(max_workers=1) as thread:
        thread.submit(asyncio.run, coro).result()


@pytest.fixture(scope="module")
def engine(tiny_sd: Path) -> Iterator[DiffusionEngine]:
    """One loaded engine for the module: it keeps no state bound to an event loop between jobs."""
    sd = DiffusionEngine([ImageModelConfig(id=MODEL, source=str(tiny_sd))])
    _in_own_loop(sd.start())
    yield sd
    _in_own_loop(sd.close())


def image_job(**params: Any) -> ImageJob:
    """A small, fast image job: 64x48, 3 steps, seed 1234 unless given."""
    params.setdefault("prompt", "a lighthouse at dusk")
    params.setdefault("seed", 1234)
    params.setdefault("steps", 3)
    params.setdefault("width", WIDTH)
    params.setdefault("height", HEIGHT)
    return ImageJob(
        id=new_job_id(),
        model=params.pop("model", MODEL),
        created_ms=int(time.time() * 1000),
        params=ImageParams(**params),
    )


async def run_job(
    engine: DiffusionEngine, job: ImageJob, cancel: threading.Event | None = None
) -> tuple[list[Progress], Done]:
    """Every event of a job: progress events, then exactly one done."""
    events = [e async for e in engine.run(job, cancel or threading.Event())]
    *progress, done = events
    assert isinstance(done, Done)
    assert all(isinstance(p, Progress) for p in progress)
    return [p for p in progress if isinstance(p, Progress)], done


def png_of(ref: ImageRef) -> Image.Image:
    assert ref.b64_png is not None
    image = Image.open(io.BytesIO(base64.b64decode(ref.b64_png)))
    assert image.format == "PNG"
    image.load()
    return image


def pixels(ref: ImageRef) -> bytes:
    """The image's RGB pixels: what differs when only the PNG's infotext would not."""
    return png_of(ref).tobytes()


def encoded(color: tuple[int, int, int], fmt: str = "PNG", size: tuple[int, int] = (40, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


async def test_models_rpc_and_memory(engine: DiffusionEngine) -> None:
    assert engine.models() == [ModelInfo(id=MODEL, kind="sd")]
    assert engine.kind == "sd"
    assert engine.gpu_memory_bytes() is None  # CPU only here
    # Image models answer no request/reply operations: the engine has not that ability at all.
    assert isinstance(engine, ReportsGpuMemory)
    assert not isinstance(engine, AnswersRpc)


def test_tiny_sd_is_reused(tiny_sd: Path) -> None:
    index = tiny_sd / "model_index.json"
    before = index.stat().st_mtime_ns
    assert build_tiny_sd(tiny_sd) == tiny_sd
    assert index.stat().st_mtime_ns == before
    size = sum(f.stat().st_size for f in tiny_sd.rglob("*") if f.is_file())
    assert size < 16 * 2**20


async def test_txt2img_batches_sizes_and_seeds(engine: DiffusionEngine) -> None:
    progress, done = await run_job(engine, image_job(seed=1000, steps=2, batch_size=2, n_iter=2))
    assert done.finish_reason == "stop"
    assert done.seed == 1000
    assert [im.seed for im in done.images] == [1000, 1001, 1002, 1003]
    for ref in done.images:
        assert (ref.width, ref.height) == (WIDTH, HEIGHT)
        assert png_of(ref).size == (WIDTH, HEIGHT)
    assert done.timings.predicted_n == 4  # 2 steps x 2 iterations
    assert done.timings.predicted_ms > 0
    assert len({pixels(im) for im in done.images}) == 4
    assert progress[-1].step == progress[-1].total == 4


async def test_same_job_same_bytes_other_seed_other_bytes(engine: DiffusionEngine) -> None:
    _, first = await run_job(engine, image_job(seed=7))
    _, again = await run_job(engine, image_job(seed=7))
    _, other = await run_job(engine, image_job(seed=8))
    assert first.images[0].b64_png == again.images[0].b64_png
    assert pixels(first.images[0]) != pixels(other.images[0])


async def test_prompts_steer_and_samplers_do_not_leak(engine: DiffusionEngine) -> None:
    _, plain = await run_job(engine, image_job(seed=9))
    _, other_prompt = await run_job(engine, image_job(seed=9, prompt="a red bicycle"))
    _, negative = await run_job(engine, image_job(seed=9, negative_prompt="fog"))
    _, ddim = await run_job(engine, image_job(seed=9, sampler="DDIM"))
    _, again = await run_job(engine, image_job(seed=9))  # after DDIM: the default sampler still
    images = [pixels(r.images[0]) for r in (plain, other_prompt, negative, ddim)]
    assert len(set(images)) == 4
    assert again.images[0].b64_png == plain.images[0].b64_png


async def test_an_image_of_a_batch_is_reproduced_alone(engine: DiffusionEngine) -> None:
    _, batch = await run_job(engine, image_job(seed=50, batch_size=2))
    _, alone = await run_job(engine, image_job(seed=51))
    in_batch, single = png_of(batch.images[1]), png_of(alone.images[0])
    # Batched and single CPU kernels may round differently: equal to within a shade.
    pixels = zip(in_batch.tobytes(), single.tobytes(), strict=True)
    assert max(abs(a - b) for a, b in pixels) <= 2


async def test_progress_is_monotonic_and_ends_at_total(engine: DiffusionEngine) -> None:
    progress, done = await run_job(engine, image_job(steps=4, n_iter=2))
    assert [p.step for p in progress] == list(range(1, 9))  # one event per step, in order
    assert {p.total for p in progress} == {8}
    assert progress[-1].step == 8
    assert done.timings.predicted_n == 8
    assert all(p.eta_s is not None and p.eta_s >= 0 for p in progress)
    assert progress[-1].eta_s == 0


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
async def test_img2img_runs_the_reduced_schedule(engine: DiffusionEngine, fmt: str) -> None:
    red = image_job(
        steps=4, denoising_strength=0.5, init_images=[{"b64": encoded((220, 20, 20), fmt)}]
    )
    progress, done = await run_job(engine, red)
    assert done.finish_reason == "stop"
    assert progress[-1].step == progress[-1].total == 2  # int(4 x 0.5), as diffusers runs it
    assert done.timings.predicted_n == 2
    image = png_of(done.images[0])
    assert image.size == (WIDTH, HEIGHT)
    assert "Denoising strength: 0.5" in image.info["parameters"]
    blue = image_job(
        steps=4, denoising_strength=0.5, init_images=[{"b64": encoded((20, 20, 220), fmt)}]
    )
    _, other = await run_job(engine, blue)
    assert pixels(other.images[0]) != pixels(done.images[0])  # the init image is really used


async def test_cancel_mid_run_stops_between_steps(engine: DiffusionEngine) -> None:
    cancel = threading.Event()
    job = image_job(steps=30, n_iter=2)
    events = []
    async for event in engine.run(job, cancel):
        events.append(event)
        cancel.set()  # from the first progress event on
    *progress, done = events
    assert isinstance(done, Done)
    assert done.finish_reason == "cancelled"
    assert done.images == []
    assert done.seed == job.params.seed
    assert progress
    assert all(isinstance(p, Progress) and p.step < p.total for p in progress)


async def test_cancelled_before_it_starts(engine: DiffusionEngine) -> None:
    cancel = threading.Event()
    cancel.set()
    progress, done = await run_job(engine, image_job(), cancel)
    assert progress == []
    assert done.finish_reason == "cancelled"


@pytest.mark.parametrize("sampler", list(SAMPLERS))
async def test_every_sampler_runs(engine: DiffusionEngine, sampler: str) -> None:
    # scipy (LMS's) is in the sd extra: every sampler must run, none may say "not installed".
    progress, done = await run_job(engine, image_job(sampler=sampler, steps=2))
    assert done.finish_reason == "stop"
    assert len(done.images) == 1
    assert png_of(done.images[0]).size == (WIDTH, HEIGHT)
    assert progress[-1].step == progress[-1].total >= 2


async def test_sampler_aliases_are_accepted(engine: DiffusionEngine) -> None:
    _, alias = await run_job(engine, image_job(sampler="k_euler_a"))
    _, name = await run_job(engine, image_job(sampler="Euler a"))
    assert alias.images[0].b64_png == name.images[0].b64_png


async def test_unknown_sampler_is_invalid(engine: DiffusionEngine) -> None:
    with pytest.raises(InvalidRequest, match="DPM\\+\\+ 2M Karras") as raised:
        await run_job(engine, image_job(sampler="Euler b"))
    assert raised.value.param == "sampler_name"


@pytest.mark.parametrize(
    "item",
    [
        {"b64": "this is not base64!"},
        {"b64": base64.b64encode(b"plain text, no image").decode()},
        {"b64": encoded((1, 2, 3), "GIF")},  # an image, but not one of the formats we take
        {"object": "images/abc"},  # objects are resolved before the engine: unresolved is bad
    ],
)
async def test_undecodable_init_image_is_invalid(
    engine: DiffusionEngine, item: dict[str, str]
) -> None:
    with pytest.raises(InvalidRequest) as raised:
        await run_job(engine, image_job(init_images=[item]))
    assert raised.value.param == "init_images"


async def test_an_init_image_past_the_pixel_budget_is_refused_before_decoding(
    engine: DiffusionEngine,
) -> None:
    """A NATS-native job skips the edge: 17 KB declaring 144 megapixels (1.2 GB of worker
    memory once decoded, before this check) is an invalid request, and nothing is decoded."""
    assert Image.MAX_IMAGE_PIXELS == engine.max_input_pixels == 4096 * 4096
    bomb = {"b64": base64.b64encode(huge_png()).decode()}
    process = psutil.Process()
    before = process.memory_info().rss
    with pytest.raises(InvalidRequest, match="12000 x 12000 pixels") as raised:
        await run_job(engine, image_job(init_images=[bomb]))
    assert raised.value.param == "init_images"
    assert process.memory_info().rss - before < 50 * 1024 * 1024


async def test_unknown_model(engine: DiffusionEngine) -> None:
    with pytest.raises(ModelNotFound):
        await run_job(engine, image_job(model="no-such-model"))
    _, done = await run_job(engine, image_job(model=" Tiny "))  # the id's subject slug
    assert done.finish_reason == "stop"


async def test_concurrent_jobs_queue_in_the_thread(engine: DiffusionEngine) -> None:
    jobs = [image_job(seed=s) for s in (3, 4)]
    together = await asyncio.gather(*(run_job(engine, j) for j in jobs))
    for job, (_, done) in zip(jobs, together, strict=True):
        _, alone = await run_job(engine, image_job(seed=job.params.seed))
        assert done.images[0].b64_png == alone.images[0].b64_png


async def test_close_cancels_the_running_job(tiny_sd: Path) -> None:
    sd = DiffusionEngine([ImageModelConfig(id="other", source=str(tiny_sd), threads=1)])
    try:
        await sd.start()
        assert sd._thread is not None  # OpenMP keeps the count per thread: ask the engine's
        assert sd._thread.submit(torch.get_num_threads).result() == 1
        events = []
        closing = None
        async for event in sd.run(image_job(model="other", steps=50), threading.Event()):
            events.append(event)
            closing = closing or asyncio.create_task(sd.close())
        assert closing is not None
        await closing
        done = events[-1]
        assert isinstance(done, Done)
        assert done.finish_reason == "cancelled"
        with pytest.raises(ModelNotFound):
            await run_job(sd, image_job(model="other"))
    finally:
        await sd.close()


async def test_png_carries_the_infotext(engine: DiffusionEngine) -> None:
    job = image_job(negative_prompt="blurry, low quality", sampler="k_dpmpp_2m", batch_size=2)
    _, done = await run_job(engine, job)
    for ref in done.images:
        text = png_of(ref).info["parameters"]
        assert text == infotext(job.params, ref.seed, MODEL)
        assert f"Seed: {ref.seed}," in text
    assert text.splitlines() == [
        "a lighthouse at dusk",
        "Negative prompt: blurry, low quality",
        "Steps: 3, Sampler: DPM++ 2M, CFG scale: 7.0, Seed: 1235, Size: 64x48, Model: tiny",
    ]


async def test_previews_decode_at_latent_size(engine: DiffusionEngine) -> None:
    progress, _ = await run_job(engine, image_job(steps=4, preview_every=2))
    previews = [p for p in progress if p.preview]
    assert previews
    for p in previews:
        image = Image.open(io.BytesIO(base64.b64decode(p.preview or "")))
        assert image.format == "PNG"
        assert image.size == (WIDTH // 8, HEIGHT // 8)
    without, _ = await run_job(engine, image_job(steps=4))
    assert all(p.preview is None for p in without)


def test_infotext_format() -> None:
    params = ImageParams(prompt="a cat", seed=123, sampler="k_euler_a")
    assert infotext(params, 123, "sd-1.5") == (
        "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7.0, Seed: 123, Size: 512x512, Model: sd-1.5"
    )
    img2img = ImageParams(prompt="a cat", seed=124, cfg_scale=7.5, init_images=[{"b64": "x"}])
    assert infotext(img2img, 124, "sd:v1").endswith(
        'CFG scale: 7.5, Seed: 124, Size: 512x512, Model: "sd:v1", Denoising strength: 0.75'
    )
