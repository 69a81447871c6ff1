"""The diffusion image engine: Stable Diffusion models through diffusers, progress streamed per step.

Thread model: torch work runs in one thread per engine, for its whole life: the
models are loaded there and every job runs there, one at a time. A worker with
more slots than one takes more jobs, but they queue in this thread (one GPU
serves one denoising loop well; two interleaved ones only share it). The
thread hands each step's ``Progress`` to the event loop through a
``ThreadStream``; the loop yields every one to the runtime (a step takes far
longer than publishing an event, so nothing is coalesced).

Each model is served as text-to-image and image-to-image pipelines that share
one set of weights (``from_pipe``); each job gets its own scheduler (see
``denoise``). On CUDA the weights are float16, on the CPU float32.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import logging
import threading
import time
from collections.abc import AsyncGenerator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from diffusers.pipelines.auto_pipeline import (
    AutoPipelineForImage2Image,
    AutoPipelineForText2Image,
)
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from schemas.events import Done, EngineEvent, Progress
from schemas.fleet import ModelInfo
from schemas.image_size import DEFAULT_MAX_INPUT_PIXELS
from schemas.jobs import ImageJob
from schemas.subjects import JobKind
from workers.engines.base import by_id, loaded_model
from workers.engines.denoise import Pipelines, generate
from workers.engines.image_codec import limit_pixels
from workers.engines.thread_stream import ThreadStream
from workers.queue_time import queue_ms, with_queue_ms

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ImageModelConfig:
    """One image model: its id, where it loads from (a local directory or a hub id) and where it runs.

    ``device`` is "auto" (CUDA when there is one), "cuda", "cuda:N" or "cpu"; ``threads``
    sets torch's CPU thread count for its jobs (in the engine's thread: OpenMP keeps the
    count per calling thread).
    """

    id: str
    source: str
    device: str = "auto"
    threads: int | None = None


class DiffusionEngine:
    """An ``ImageEngine`` serving diffusers pipelines; it ``ReportsGpuMemory``."""

    kind: JobKind = "sd"

    def __init__(
        self,
        configs: Sequence[ImageModelConfig],
        *,
        max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
    ) -> None:
        self.configs = by_id(configs, "diffusion")
        self.max_input_pixels = max_input_pixels  # of an init image, as its header declares
        limit_pixels(max_input_pixels)
        self._pipes: dict[str, Pipelines] = {}
        self._thread: ThreadPoolExecutor | None = None
        self._aborts: set[threading.Event] = set()  # one per job not yet finished or abandoned
        self._cuda = False  # a flag, not a look at _pipes: metrics may read it from any thread

    def models(self) -> list[ModelInfo]:
        """The configured models."""
        return [ModelInfo(id=c.id, kind="sd") for c in self.configs.values()]

    async def start(self) -> None:
        """Load every model in the engine's thread, logging progress; a second call does nothing."""
        if self._pipes:
            return
        # tqdm bars would interleave with the worker's log lines; start() logs progress itself.
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        thread = self._executor()
        loop = asyncio.get_running_loop()
        try:
            for c in self.configs.values():
                log.info("loading %s from %s ...", c.id, c.source)
                started = time.perf_counter()
                pipes = await loop.run_in_executor(thread, _load, c)
                self._pipes[c.id] = pipes
                self._cuda = self._cuda or pipes.text2image.device.type == "cuda"
                log.info("loaded %s in %.2f s", c.id, time.perf_counter() - started)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop running jobs (within a step), end the thread and free the models; start() may reload."""
        for abort in self._aborts:
            abort.set()
        if self._thread is not None:
            # Waits for the running job's current step; queued jobs see their abort and return.
            await asyncio.to_thread(self._thread.shutdown, wait=True)
            self._thread = None
        self._pipes.clear()
        gc.collect()
        if self._cuda:
            torch.cuda.empty_cache()  # hand the freed weights' memory back to the device
        self._cuda = False

    def gpu_memory_bytes(self) -> int | None:
        """CUDA memory held by torch's tensors, for the worker's metrics; None off CUDA."""
        return int(torch.cuda.memory_allocated()) if self._cuda else None

    async def run(
        self, job: ImageJob, cancel: threading.Event
    ) -> AsyncGenerator[EngineEvent, None]:
        """Generate in the engine's thread; yield progress, then done."""
        pipes = self._model(job.model)
        waited_ms = queue_ms(job)
        stream: ThreadStream[Progress, Done] = ThreadStream()
        abort = threading.Event()  # the runtime stopped listening, or the engine is closing

        def stop() -> bool:
            return cancel.is_set() or abort.is_set()

        self._aborts.add(abort)
        # Submitted, not run_in_executor: an asyncio future would tie the job's bookkeeping
        # to this loop, and the thread may finish after the loop is gone.
        budget = self.max_input_pixels
        work = stream.work(lambda send: generate(pipes, job, send, stop, max_input_pixels=budget))
        self._executor().submit(work)
        try:
            # Every step's progress, in order: a step takes far longer than sending its event.
            async with contextlib.aclosing(stream.batches()) as batches:
                async for steps in batches:
                    for progress in steps:
                        yield progress
            yield with_queue_ms(stream.result, waited_ms)
        finally:
            abort.set()
            self._aborts.discard(abort)

    def _executor(self) -> ThreadPoolExecutor:
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffusion")
        return self._thread

    def _model(self, model_id: str) -> Pipelines:
        """The loaded model a job names (by id, or by the id's subject slug)."""
        return loaded_model(self._pipes, model_id)[1]


def _load(c: ImageModelConfig) -> Pipelines:
    """Load one model (in the engine's thread): text-to-image, and image-to-image sharing it."""
    if c.threads is not None:
        torch.set_num_threads(c.threads)
    device = _device(c.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    # Without accelerate diffusers can only load the plain way, and warns each time it falls back.
    accelerate = importlib.util.find_spec("accelerate") is not None
    text2image: DiffusionPipeline = AutoPipelineForText2Image.from_pretrained(
        c.source, dtype=dtype, low_cpu_mem_usage=accelerate
    ).to(device)
    # from_pipe casts the shared modules to its dtype (float32 by default): pass ours.
    image2image: DiffusionPipeline = AutoPipelineForImage2Image.from_pipe(text2image, dtype=dtype)
    for pipe in (text2image, image2image):
        pipe.set_progress_bar_config(disable=True)
    log.info("%s runs on %s as %s", c.id, device, str(dtype).removeprefix("torch."))
    return Pipelines(text2image, image2image, c.threads)


def _device(wanted: str) -> torch.device:
    """CUDA when asked for (or "auto") and present, else the CPU."""
    cuda = wanted in ("auto", "cuda") or wanted.startswith("cuda:")
    if cuda and torch.cuda.is_available():
        return torch.device("cuda" if wanted == "auto" else wanted)
    if wanted not in ("auto", "cpu"):
        log.warning("device %s is not available here: using the CPU", wanted)
    return torch.device("cpu")
