"""One image job on a loaded diffusers pipeline: runs in the engine's thread, never on the loop.

``generate`` reports every denoising step through a callback and returns the
job's ``Done``. A1111's seeding: image ``i`` of the job (over ``n_iter`` batches
of ``batch_size``) has seed ``seed + i`` and a generator of its own, so any
image can be reproduced alone. The generators are CPU generators whatever the
device (A1111's "RNG source: CPU"), so a seed starts from the same noise on
every worker of a pool, GPU or not: a retried job lands where it may.
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from PIL import Image

from schemas.errors import Retry
from schemas.events import Done, ImageRef, Progress, Timings
from schemas.image_size import DEFAULT_MAX_INPUT_PIXELS
from schemas.infotext import infotext
from schemas.jobs import ImageJob
from workers.engines.image_codec import decode_init_image, png_base64
from workers.engines.previews import latent_preview
from workers.engines.schedulers import make_scheduler


@dataclass(frozen=True, slots=True)
class Pipelines:
    """A loaded model: its text-to-image pipeline and the image-to-image one sharing its weights."""

    text2image: DiffusionPipeline
    image2image: DiffusionPipeline
    threads: int | None = None


_NUMPY_INTEROP_WARNINGS = (
    "__array__ implementation doesn't accept a copy keyword",
    "__array_wrap__ must accept context and return_scalar arguments",
)


class _Stopped(Exception):
    """Raised from the step callback to leave the denoising loop when the job is cancelled."""


@dataclass(slots=True)
class _Steps:
    """Counts denoising steps across a job's iterations, for progress, ETA and timings."""

    emit: Callable[[Progress], None]
    stop: Callable[[], bool]
    n_iter: int
    preview_every: int
    done: int = 0
    loop_s: float = 0.0  # finished iterations' time in the denoising loop
    iteration_started: float = field(default_factory=time.perf_counter)

    def start_iteration(self) -> None:
        self.iteration_started = time.perf_counter()

    def end_iteration(self) -> None:
        self.loop_s += time.perf_counter() - self.iteration_started

    def on_step_end(self, pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        """diffusers' ``callback_on_step_end``: report the step, stop when cancelled."""
        self.done += 1
        # num_timesteps is what the pipeline's loop iterates, the same in every iteration:
        # img2img's shortened schedule and second-order samplers' extra steps (Heun, DPM2)
        # included, so the last step of the last iteration is step == total.
        total = int(pipe.num_timesteps) * self.n_iter
        # The first step of an iteration also carries its prompt encoding: a slight overestimate.
        elapsed = self.loop_s + time.perf_counter() - self.iteration_started
        preview = None
        if self.preview_every > 0 and self.done % self.preview_every == 0:
            preview = latent_preview(tensors["latents"])
        eta_s = elapsed / self.done * (total - self.done)
        self.emit(Progress(step=self.done, total=total, eta_s=eta_s, preview=preview))
        if self.stop():
            raise _Stopped
        return {}


def generate(
    pipes: Pipelines,
    job: ImageJob,
    emit: Callable[[Progress], None],
    stop: Callable[[], bool],
    *,
    max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
) -> Done:
    """Run every iteration of the job; ``Done(cancelled)`` as soon as ``stop()`` says so.
    An init image may declare at most ``max_input_pixels``."""
    p = job.params
    if stop():  # cancelled while queued behind another job
        return Done(finish_reason="cancelled", seed=p.seed)
    if pipes.threads is not None and torch.get_num_threads() != pipes.threads:
        torch.set_num_threads(pipes.threads)  # this thread's count; models may differ
    steps = _Steps(emit, stop, p.n_iter, p.preview_every)
    images: list[ImageRef] = []
    try:
        with _library_warnings_silenced():
            pipe, inputs = _pipeline(pipes, job, max_input_pixels)
            for k in range(p.n_iter):
                seeds = [p.seed + k * p.batch_size + j for j in range(p.batch_size)]
                steps.start_iteration()
                out = pipe(
                    **inputs,
                    generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                    callback_on_step_end=steps.on_step_end,
                )
                steps.end_iteration()
                images += [_image_ref(job, im, s) for im, s in zip(out.images, seeds, strict=True)]
    except _Stopped:
        return Done(finish_reason="cancelled", seed=p.seed)
    except torch.cuda.OutOfMemoryError as e:
        raise Retry("out of GPU memory; another worker may have enough") from e
    timings = Timings(predicted_n=steps.done, predicted_ms=steps.loop_s * 1000)
    return Done(finish_reason="stop", seed=p.seed, images=images, timings=timings)


def _pipeline(pipes: Pipelines, job: ImageJob, max_input_pixels: int) -> tuple[Any, dict[str, Any]]:
    """A per-job pipeline with the job's sampler, and the call's arguments but the generators.

    The pipeline is a shallow copy of the loaded one: the same modules (weights), its own
    scheduler, which is stateful and set per job, so the shared pipeline is never mutated.
    It is typed Any: each pipeline class registers its components and defines ``__call__``,
    the base class declares neither.
    """
    p = job.params
    inputs: dict[str, Any] = {
        "prompt": p.prompt,
        "negative_prompt": p.negative_prompt or None,
        "num_inference_steps": p.steps,
        "guidance_scale": p.cfg_scale,
        "num_images_per_prompt": p.batch_size,
    }
    if p.init_images:
        base = pipes.image2image
        inputs["image"] = decode_init_image(p.init_images[0], p.width, p.height, max_input_pixels)
        inputs["strength"] = p.denoising_strength
    else:
        base = pipes.text2image
        inputs["width"], inputs["height"] = p.width, p.height
    pipe: Any = copy.copy(base)
    # DiffusionPipeline.__setattr__ records the new scheduler in the copy's own config only.
    pipe.scheduler = make_scheduler(p.sampler, pipe.scheduler.config)
    return pipe, inputs


def _image_ref(job: ImageJob, image: Image.Image, seed: int) -> ImageRef:
    text = infotext(job.params, seed, job.model)
    return ImageRef(
        width=image.width,
        height=image.height,
        seed=seed,
        b64_png=png_base64(image, parameters=text),
    )


@contextlib.contextmanager
def _library_warnings_silenced() -> Iterator[None]:
    """Ignore known-harmless library warnings while schedulers are built and run.

    diffusers' schedulers hand torch tensors to numpy (``np.array``, ``np.maximum``), and
    numpy 2 warns that torch's ``__array__`` takes no ``copy`` keyword and its
    ``__array_wrap__`` no ``context``/``return_scalar``; it falls back and the values are
    right. ``catch_warnings`` swaps the process-wide filter list for the job's duration;
    nothing else in a worker changes warning filters.
    """
    with warnings.catch_warnings():
        for message in _NUMPY_INTEROP_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)
        yield
