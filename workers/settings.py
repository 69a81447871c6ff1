"""Worker settings: one object, built at start-up and passed inward."""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field

from schemas.image_size import DEFAULT_MAX_INPUT_PIXELS
from schemas.image_store import DEFAULT_INLINE_CHARS
from schemas.settings import CommonSettings

# A text worker's default slots: sequences of one llama.cpp batch, as many as llama-server's
# own default (-np auto). Each adds n_ctx cells to the model's KV cache.
TEXT_SLOTS = 4


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


class WorkerSettings(CommonSettings):
    """How one worker process fetches, heartbeats and shuts down."""

    worker_id: str = Field(default_factory=_default_worker_id)
    slots: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="jobs run at once (default: TEXT_SLOTS on a llama.cpp worker, whose slots "
        "are sequences of one batch; 1 otherwise)",
    )
    fetch_timeout_s: float = Field(default=2.0, gt=0, description="long-poll of one fetch")
    heartbeat_s: float = Field(default=3.0, gt=0, description="registry heartbeat interval")
    in_progress_s: float = Field(
        default=1.0, gt=0, description="+WPI interval while a job runs (below ack_wait)"
    )
    job_beat_s: float = Field(
        default=0.2,
        gt=0,
        description="per-job liveness beat while a job runs: followers hand a job over "
        "after a few missed beats (schemas.failover)",
    )
    handover_below_s: float = Field(
        default=2.0,
        ge=0,
        description="SIGTERM: jobs expected to end within this finish here; the others are "
        "handed over to another worker at once",
    )
    handover_nak_delay_s: float = Field(
        default=2.0,
        ge=0,
        description="SIGTERM: a handed-over job's message comes back after this (run again "
        "when nobody followed it to continue it, terminated when somebody did)",
    )
    retry_delay_s: float = Field(
        default=1.0, ge=0, description="nak delay after an unexpected failure"
    )
    shutdown_grace_s: float = Field(
        default=25.0, ge=0, description="SIGTERM: time to finish held jobs"
    )
    cancel_memory_s: float = Field(
        default=600.0, gt=0, description="how long a cancel is remembered"
    )
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="serve /metrics on this port (None: no server)"
    )
    metrics_host: str = Field(
        default="127.0.0.1", description="address of the /metrics server (0.0.0.0 for Prometheus)"
    )
    echo_token_delay_s: float = Field(default=0.0, ge=0, description="echo engine: delay per token")
    echo_tokens: int = Field(
        default=16, ge=1, description="echo engine: tokens when max_tokens is unset"
    )
    llm_models: str = Field(
        default="",
        description="llm: models as ID=PATH.gguf, comma-separated (empty: the bundled SmolLM2)",
    )
    llm_embedding_models: str = Field(
        default="",
        description="llm: embedding-only models (a dedicated embedding GGUF) as ID=PATH.gguf, "
        "comma-separated: they compute embeddings and generate nothing",
    )
    llm_embeddings: bool = Field(
        default=True,
        description="llm: the text models also compute embeddings (a second, embedding-mode "
        "context on the same weights)",
    )
    llm_pooling: Literal["mean", "cls", "last"] | None = Field(
        default=None,
        description="llm: pooling of embeddings (default: the GGUF's own, else mean)",
    )
    llm_n_ctx: int = Field(
        default=2048,
        ge=0,
        description="llm: context size in tokens, per slot (0: the model's own)",
    )
    llm_threads: int | None = Field(
        default=None, ge=1, description="llm: CPU threads of a model's context (default: CPUs)"
    )
    llm_threads_batch: int | None = Field(
        default=None,
        ge=1,
        description="llm: CPU threads for steps of more than one token (default: as llm_threads)",
    )
    llm_flash_attn: Literal["auto", "on", "off"] = Field(
        default="auto", description="llm: flash attention (auto: where llama.cpp's backend has it)"
    )
    llm_stream_interval_ms: float = Field(
        default=40.0,
        ge=0,
        le=1000,
        description="llm: a job's text goes out at most once per interval x the jobs running "
        "(the first token at once), coalesced into one delta: fewer wake-ups and messages per "
        "token on the worker, the broker and the edge (0: every token as it comes)",
    )
    llm_cache_seqs: int | None = Field(
        default=None,
        ge=0,
        description="llm: finished sequences kept in cells for prompt-prefix reuse (default: "
        "slots; 0: off; with a stream per slot, each free slot's stream keeps its last one)",
    )
    llm_cache_ram_mib: int = Field(
        default=2048,
        ge=0,
        description="llm: host memory (MiB) that cached sequences the KV cache lets go are "
        "copied to, and back from for a prompt sharing their prefix (0: off)",
    )
    llm_kv_unified: bool = Field(
        default=False,
        description="llm: one KV cache for every slot instead of a stream per slot (a token "
        "then reads every sequence's cells: slower steps; running sequences share prefix "
        "cells, and more finished sequences than slots stay in cells)",
    )
    llm_gpu_layers: int = Field(
        default=0, ge=-1, description="llm: layers offloaded to the GPU (-1: all)"
    )
    llm_chat_template_file: Path | None = Field(
        default=None, description="llm: a Jinja chat template replacing the GGUF's own"
    )
    image_inline_chars: int = Field(
        default=DEFAULT_INLINE_CHARS,
        ge=0,
        description="sd: results above this many base64 characters go to the images object store",
    )
    image_max_input_pixels: int = Field(
        default=DEFAULT_MAX_INPUT_PIXELS,
        ge=64 * 64,
        description="sd: largest init image, in pixels as its header declares them",
    )
    sd_models: str = Field(
        default="",
        description="sd: models as ID=DIR-or-hub-id, comma-separated (empty: the demo tiny-sd)",
    )
    sd_demo_dir: Path = Field(
        default=Path("~/.cache/headrace/tiny-sd"),
        description="sd: where the demo tiny-sd pipeline is built when no model is given",
    )
    sd_device: str = Field(default="auto", description="sd: auto (CUDA when present), cuda or cpu")
    sd_threads: int | None = Field(
        default=None, ge=1, description="sd: CPU threads for torch (default: torch's own)"
    )
