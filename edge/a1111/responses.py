"""A1111 response bodies: generation results with their ``info`` string, progress, models."""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path
from typing import Any

import orjson

from edge.a1111.requests import Img2ImgRequest, Txt2ImgRequest
from edge.imaging import ImageResult
from edge.tasks import Task
from schemas.fleet import ModelInfo
from schemas.infotext import infotext, parse_infotext
from schemas.jobs import ImageParams
from schemas.samplers import SAMPLERS


def generation(
    body: dict[str, Any], req: Txt2ImgRequest, params: ImageParams, model: str, result: ImageResult
) -> dict[str, Any]:
    """``{images, parameters, info}``: ``parameters`` echoes the request (input images left out)
    and ``info`` is a JSON string, as A1111 makes them."""
    count = params.batch_size * params.n_iter
    seeds = [params.seed + i for i in range(count)]
    info = {
        "prompt": params.prompt,
        "all_prompts": [params.prompt] * count,
        "negative_prompt": params.negative_prompt,
        "all_negative_prompts": [params.negative_prompt] * count,
        "seed": params.seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * count,
        "subseed_strength": 0,
        "width": params.width,
        "height": params.height,
        "sampler_name": params.sampler,
        "cfg_scale": params.cfg_scale,
        "steps": params.steps,
        "batch_size": params.batch_size,
        "restore_faces": False,
        "sd_model_name": model,
        "sd_model_hash": None,
        # A number on txt2img too, as A1111 sends it (its txt2img default is 0.75): the Unity
        # integration reads it into a float and fails on null.
        "denoising_strength": params.denoising_strength,
        "index_of_first_image": 0,
        "infotexts": [infotext(params, s, model) for s in seeds[: len(result.images)]],
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "interrupted": result.done.finish_reason == "cancelled",
    }
    parameters = {k: v for k, v in body.items() if k not in ("init_images", "mask")}
    if isinstance(req, Img2ImgRequest):
        parameters["init_images"] = None  # as A1111: input images are not echoed back
    return {
        "images": [base64.b64encode(png).decode() for png in result.images],
        "parameters": parameters,
        "info": orjson.dumps(info).decode(),
    }


def progress(task: Task | None) -> dict[str, Any]:
    """``GET /sdapi/v1/progress`` for one task (or for none: idle)."""
    if task is None:
        return {
            "progress": 0.0,
            "eta_relative": 0.0,
            "state": _state(None),
            "current_image": None,
            "textinfo": None,
        }
    return {
        "progress": task.fraction,
        "eta_relative": task.eta_s or 0.0,
        "state": _state(task),
        "current_image": task.preview,
        "textinfo": "In queue" if task.queued else None,
        "id_task": task.id,
    }


def _state(task: Task | None) -> dict[str, Any]:
    return {
        "skipped": task.skipped if task else False,
        "interrupted": task.interrupted if task else False,
        "job": task.id if task else "",
        "job_count": 1 if task else 0,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(task.started))
        if task
        else "0",
        "job_no": 0,
        "sampling_step": task.step if task else 0,
        "sampling_steps": task.total if task else 0,
    }


def sd_models(models: list[ModelInfo]) -> list[dict[str, Any]]:
    """``GET /sdapi/v1/sd-models``: the live image models (their titles are their ids)."""
    return [
        {
            "title": m.id,
            "model_name": m.id,
            "hash": None,
            "sha256": None,
            "filename": m.id,
            "config": None,
        }
        for m in sorted(models, key=lambda m: m.id)
    ]


def samplers() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/samplers``."""
    return [{"name": n, "aliases": list(a), "options": {}} for n, a in SAMPLERS.items()]


def png_info(texts: dict[str, str]) -> dict[str, Any]:
    """``POST /sdapi/v1/png-info``: the ``parameters`` text as ``info`` and parsed, the image's
    other text chunks as ``items``."""
    info = texts.get("parameters", "")
    items = {k: v for k, v in texts.items() if k != "parameters"}
    return {"info": info, "items": items, "parameters": parse_infotext(info) if info else {}}


def memory() -> dict[str, Any]:
    """``GET /sdapi/v1/memory`` in A1111's ``{ram, cuda}`` shape, of the edge process: it holds
    no GPU (workers report theirs in their Prometheus metrics)."""
    ram: dict[str, Any]
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
        used = int(Path("/proc/self/statm").read_text().split()[1]) * page  # resident pages
        ram = {"free": total - used, "used": used, "total": total}  # A1111's free: total - rss
    except (OSError, ValueError, IndexError) as e:
        ram = {"error": str(e) or type(e).__name__}
    cuda = {"error": "the edge holds no GPU; workers report their GPU memory in their metrics"}
    return {"ram": ram, "cuda": cuda}
