"""``headrace worker KIND``: build the engine, run the runtime, stop cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvloop

from schemas.subjects import model_slug
from workers import metrics
from workers.engines.base import Engine
from workers.engines.echo import EchoEngine
from workers.runtime import Runtime
from workers.settings import TEXT_SLOTS, WorkerSettings

if TYPE_CHECKING:
    from workers.engines.diffusion import DiffusionEngine
    from workers.engines.llama import LlamaEngine

DEMO_SD_MODEL = "tiny-sd"

log = logging.getLogger(__name__)


def echo_engine(settings: WorkerSettings, model: str = "echo") -> EchoEngine:
    """The echo engine configured from worker settings."""
    return EchoEngine(
        model, token_delay_s=settings.echo_token_delay_s, default_tokens=settings.echo_tokens
    )


def parse_models(spec: str) -> dict[str, Path]:
    """``ID=PATH,ID2=PATH2`` as a dict; a bare PATH is served under its file name's stem."""
    out: dict[str, Path] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        model_id, sep, path = item.partition("=")
        if not sep:
            model_id, path = Path(item).stem, item
        model_id, path = model_id.strip(), path.strip()
        if not model_id or not path:
            raise ValueError(f"a model is ID=PATH, got {item!r}")
        model_slug(model_id)  # raises ValueError when the id cannot be a subject token
        if model_id in out:
            raise ValueError(f"model {model_id!r} is given twice")
        out[model_id] = Path(path).expanduser()
    return out


def llama_engine(settings: WorkerSettings) -> LlamaEngine:
    """The llama.cpp engine configured from worker settings (the bundled SmolLM2 by default).

    One llama.cpp context per model with room for ``--slots`` sequences, decoded together.
    """
    # Imported here: llama-cpp-python is the optional ``llm`` extra, and echo workers do without.
    from workers.engines.gguf import DEFAULT_MODEL_ID, ModelConfig, bundled_gguf
    from workers.engines.llama import LlamaEngine

    embedding_only = parse_models(settings.llm_embedding_models)
    paths = parse_models(settings.llm_models)
    if not paths and not embedding_only:
        paths = {DEFAULT_MODEL_ID: bundled_gguf()}
    if twice := paths.keys() & embedding_only.keys():
        raise ValueError(f"model {sorted(twice)[0]!r} is given twice")
    template_file = settings.llm_chat_template_file
    template = template_file.read_text() if template_file is not None else None

    def config(model_id: str, path: Path, only: bool) -> ModelConfig:
        return ModelConfig(
            id=model_id,
            path=path,
            n_ctx=settings.llm_n_ctx,
            n_threads=settings.llm_threads,
            n_threads_batch=settings.llm_threads_batch,
            n_gpu_layers=settings.llm_gpu_layers,
            chat_template=template,
            # An embedding-only model has one context: its jobs take turns on it.
            contexts=1 if only else settings.slots or TEXT_SLOTS,
            embeddings=settings.llm_embeddings,
            embedding_only=only,
            pooling=settings.llm_pooling,
            flash_attn={"auto": None, "on": True, "off": False}[settings.llm_flash_attn],
            cache_seqs=settings.llm_cache_seqs,
            cache_ram_mib=settings.llm_cache_ram_mib,
            kv_unified=settings.llm_kv_unified,
            stream_interval_s=settings.llm_stream_interval_ms / 1000,
        )

    return LlamaEngine(
        [config(m, p, False) for m, p in paths.items()]
        + [config(m, p, True) for m, p in embedding_only.items()]
    )


def diffusion_engine(settings: WorkerSettings) -> DiffusionEngine:
    """The diffusers engine configured from worker settings (the demo tiny-sd by default).

    A model is ``ID=DIR`` (a saved pipeline) or ``ID=owner/name`` (a hub id; fetching from
    the hub is the deployment's business: set HF_HUB_OFFLINE=1 where it must not happen).
    """
    log.info("importing torch, transformers and diffusers ...")  # about 10 s on 2 cores
    _library_logs_as_json()
    # Imported here: torch and diffusers are the optional ``sd`` extra.
    from headrace.tiny_sd import build_tiny_sd
    from workers.engines.diffusion import DiffusionEngine, ImageModelConfig

    sources = {m: str(p) for m, p in parse_models(settings.sd_models).items()}
    if not sources:
        demo = settings.sd_demo_dir.expanduser()
        log.info("no --model given: serving the demo pipeline %s (random weights)", demo)
        sources = {DEMO_SD_MODEL: str(build_tiny_sd(demo))}
    return DiffusionEngine(
        [
            ImageModelConfig(
                id=model_id, source=source, device=settings.sd_device, threads=settings.sd_threads
            )
            for model_id, source in sources.items()
        ],
        max_input_pixels=settings.image_max_input_pixels,
    )


def _library_logs_as_json() -> None:
    """transformers and diffusers print to stderr through handlers of their own: hand their
    records to ours instead, so a worker's stderr stays JSON lines."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (transformers_logging, diffusers_logging):
        library.disable_default_handler()
        library.enable_propagation()
    # Its notices that torchvision is absent (image processors fall back to Pillow) say
    # nothing about this worker: the SD pipelines it serves use no image processor.
    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)


async def serve(settings: WorkerSettings, engine: Engine[Any]) -> None:
    """Run a worker until SIGTERM or SIGINT, then finish or nak what it holds."""
    runtime = Runtime(settings, engine)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runtime.stop)
    server = None
    if settings.metrics_port is not None:
        registry = runtime.metrics.registry
        server = await metrics.serve(registry, settings.metrics_host, settings.metrics_port)
        log.info("metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
    try:
        await runtime.run()
    finally:
        if server is not None:
            await server.cleanup()
    log.info("worker %s stopped after %d job(s)", settings.worker_id, runtime.jobs_done)


def run(settings: WorkerSettings, engine: Engine[Any]) -> None:
    """Blocking entry point of a worker process."""
    uvloop.run(serve(settings, engine))
