"""A1111 clients unchanged against the edge: webuiapi (HTTP Basic, its sync and async paths)
and the stock Unity Stable Diffusion integration (no credentials, so the anonymous key), with
a diffusers worker on the random-weight tiny-sd pipeline."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from nats.js import JetStreamContext
from PIL import Image, PngImagePlugin

from edge.settings import EdgeSettings
from tests.conftest import API_KEY, running
from workers.runtime import Runtime
from workers.settings import WorkerSettings

webuiapi = pytest.importorskip("webuiapi")

pytestmark = pytest.mark.slow

ALICE = {"Authorization": f"Bearer {API_KEY}"}
SMALL = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 2, "seed": 9}


@pytest.fixture
def edge_settings(edge_settings: EdgeSettings, tmp_path: Path) -> EdgeSettings:
    """The usual keys, plus a ``unity`` key that requests without credentials are served as."""
    sha = hashlib.sha256(b"never-shown").hexdigest()
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[[keys]]\nname = "unity"\nsha256 = "{sha}"\n')
    return edge_settings.model_copy(update={"keys_file": keys, "anonymous_key": "unity"})


def engine(tiny_sd: Path) -> Any:
    from workers.engines.diffusion import DiffusionEngine, ImageModelConfig

    return DiffusionEngine([ImageModelConfig("tiny-sd", str(tiny_sd), device="cpu", threads=1)])


@pytest.fixture
async def sd_worker(
    worker_settings: WorkerSettings, tiny_sd: Path, js: JetStreamContext
) -> AsyncIterator[Runtime]:
    async with running(worker_settings.model_copy(update={"slots": 2}), engine(tiny_sd)) as rt:
        yield rt


async def webui(edge: str, password: str = API_KEY) -> Any:
    """webuiapi's client with Basic auth; built in a thread (its constructor calls the API)."""
    return await asyncio.to_thread(
        webuiapi.WebUIApi, baseurl=f"{edge}/sdapi/v1", username="anyone", password=password
    )


async def test_webuiapi_with_basic_auth_sync_and_async(sd_worker: Runtime, edge: str) -> None:
    api = await webui(edge)
    result = await asyncio.to_thread(api.txt2img, **SMALL)
    assert result.image.size == (64, 64)
    assert result.info["denoising_strength"] == 0.7  # what webuiapi sent, echoed as A1111 does
    assert result.info["all_seeds"] == [9]
    # webuiapi's async path opens its own aiohttp session and can carry only Basic auth.
    with pytest.warns(DeprecationWarning, match="deprecated"):  # aiohttp 3.14 on webuiapi
        again = await api.txt2img(**SMALL, use_async=True)
    assert again.image.tobytes() == result.image.tobytes()
    wrong = await webui(edge, "sk-wrong")
    with pytest.raises(RuntimeError) as e:  # webuiapi's error for any non-200
        await asyncio.to_thread(wrong.txt2img, **SMALL)
    assert e.value.args[0] == 401  # a wrong key is refused even with anonymous access on


async def test_png_info_reads_back_what_the_worker_wrote(sd_worker: Runtime, edge: str) -> None:
    api = await webui(edge)
    result = await asyncio.to_thread(api.txt2img, negative_prompt="fog, rain", **SMALL)
    info = await asyncio.to_thread(api.png_info, result.image)  # webuiapi re-encodes it
    assert info.info == result.info["infotexts"][0]
    raw = info.json["parameters"]
    assert raw["Prompt"] == SMALL["prompt"]
    assert raw["Negative prompt"] == "fog, rain"
    assert (raw["Steps"], raw["Seed"], raw["Size-1"], raw["Size-2"]) == ("2", "9", "64", "64")
    assert raw["Model"] == "tiny-sd"


async def test_the_stock_unity_integration_needs_no_credentials(
    sd_worker: Runtime, edge: str
) -> None:
    # Stable-Diffusion-Unity-Integration sets the model through options, then posts txt2img
    # with no Authorization header, and reads info's denoising_strength into a float.
    async with aiohttp.ClientSession(edge) as http:
        async with http.get("/sdapi/v1/sd-models") as r:
            assert [m["title"] for m in await r.json()] == ["tiny-sd"]
        async with http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sd"}) as r:
            assert r.status == 200
        async with http.post("/sdapi/v1/txt2img", json=SMALL) as r:
            assert r.status == 200
            body = await r.json()
    info = orjson.loads(body["info"])
    assert isinstance(info["denoising_strength"], float)
    assert info["denoising_strength"] == 0.75  # A1111's txt2img default, never null


async def test_the_routes_headrace_has_nothing_for(edge: str) -> None:
    api = await webui(edge)
    assert await asyncio.to_thread(api.get_upscalers) == []
    assert await asyncio.to_thread(api.get_loras) == []
    assert await asyncio.to_thread(api.get_scripts) == {"txt2img": [], "img2img": []}
    assert await asyncio.to_thread(api.get_cmd_flags) == {}
    assert await asyncio.to_thread(api.refresh_checkpoints) is None
    assert await asyncio.to_thread(api.skip) is None  # nothing running: nothing to skip
    memory = await asyncio.to_thread(api.get_memory)
    assert memory["ram"]["used"] > 0
    assert memory["ram"]["total"] > memory["ram"]["used"]
    assert "error" in memory["cuda"]  # the edge holds no GPU


async def test_skip_stops_the_callers_current_task_only(sd_worker: Runtime, edge: str) -> None:
    long = {**SMALL, "steps": 60}
    stream = {**ALICE, "Accept": "text/event-stream"}
    async with aiohttp.ClientSession(edge, headers=ALICE) as http:
        first = asyncio.create_task(_txt2img(http, long))
        await asyncio.sleep(0.3)  # the first task is open before the second
        async with http.post("/sdapi/v1/txt2img", json=long, headers=stream) as current:
            await current.content.readuntil(b"event: progress")
            async with http.get("/sdapi/v1/progress") as r:
                assert (await r.json())["state"]["sampling_steps"] == 60
            async with http.post("/sdapi/v1/skip") as r:
                assert r.status == 200
                assert await r.json() is None
            skipped = (await current.read()).decode()
        result = orjson.loads(skipped.rsplit("data: ", 1)[1])
        assert result["images"] == []
        assert orjson.loads(result["info"])["interrupted"] is True
        finished = await asyncio.wait_for(first, 60)
    assert len(finished["images"]) == 1  # the older task went on
    assert orjson.loads(finished["info"])["interrupted"] is False


async def _txt2img(http: aiohttp.ClientSession, body: dict[str, Any]) -> dict[str, Any]:
    async with http.post("/sdapi/v1/txt2img", json=body) as r:
        assert r.status == 200
        return dict(await r.json())


def _png(texts: dict[str, str], *, compressed: bool = False) -> str:
    buffer = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    for key, value in texts.items():
        info.add_itxt(key, value, zip=True) if compressed else info.add_text(key, value)
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode()


async def test_png_info_of_any_png_and_of_bad_input(edge: str) -> None:
    text = 'a "quoted" cat\nSteps: 5, Sampler: Euler, CFG scale: 7, Size: 8x16, Model: "a, b"'
    async with aiohttp.ClientSession(edge, headers=ALICE) as http:

        async def png_info(body: Any) -> tuple[int, Any]:
            async with http.post("/sdapi/v1/png-info", json=body) as r:
                return r.status, await r.json()

        for compressed in (False, True):
            image = _png({"parameters": text, "Software": "héadrace"}, compressed=compressed)
            status, body = await png_info({"image": f"data:image/png;base64,{image}"})
            assert status == 200
            assert body["info"] == text
            assert body["items"] == {"Software": "héadrace"}
            assert body["parameters"]["Model"] == "a, b"
            assert body["parameters"]["Size-2"] == "16"
        status, body = await png_info({"image": _png({})})
        assert (status, body) == (200, {"info": "", "items": {}, "parameters": {}})
        jpeg = io.BytesIO()
        Image.new("RGB", (8, 8)).save(jpeg, format="JPEG")
        status, body = await png_info({"image": base64.b64encode(jpeg.getvalue()).decode()})
        assert (status, body["info"]) == (200, "")
        bomb = b"\x89PNG\r\n\x1a\n" + _chunk(b"zTXt", b"k\0\0" + zlib.compress(b"x" * (2 << 20)))
        truncated = base64.b64decode(_png({"parameters": text}))[:40]
        for bad, param in (
            ({}, "image"),
            ({"image": 5}, "image"),
            ({"image": "not base64!"}, "image"),
            ({"image": base64.b64encode(truncated).decode()}, "image"),
            ({"image": base64.b64encode(bomb).decode()}, "image"),
            ({"image": "https://example.com/a.png"}, "image"),
        ):
            status, body = await png_info(bad)
            assert status == 400, bad
            assert body["error"]["param"] == param
            assert set(body["error"]) == {"message", "type", "param", "code"}


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data).to_bytes(4, "big")
    return len(data).to_bytes(4, "big") + kind + data + crc
