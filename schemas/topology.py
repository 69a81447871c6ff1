"""The JetStream topology (streams, per-model consumers, buckets) and its idempotent provisioning.

The definitions live as JSON in ``nats/`` in the server's own format, so the
nats CLI can apply them too (``nats stream add --config nats/streams/JOBS.json``).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import nats.errors
import nats.js.errors
import orjson
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, ObjectStoreConfig, StreamConfig
from pydantic import BaseModel, Field

from schemas.subjects import (
    DLQ_STREAM,
    IMAGES_BUCKET,
    JOBS_STREAM,
    OPTIONS_BUCKET,
    RESULTS_STREAM,
    WORKERS_BUCKET,
    JobKind,
    consumer_name,
    job_subject,
)

log = logging.getLogger(__name__)

Change = Literal["created", "updated", "unchanged"]
_NS = 1_000_000_000


def _nats_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "nats", here / "_nats"):  # source tree, then wheel
        if (candidate / "streams").is_dir():
            return candidate
    raise FileNotFoundError("the nats/ definitions directory is missing from this install")


NATS_DIR = _nats_dir()
DEV_CONF = NATS_DIR / "dev.conf"


def _load(relative: str) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads((NATS_DIR / relative).read_bytes())
    return data


class Limits(BaseModel):
    """Overrides of the limits in ``nats/`` (None keeps the file's value)."""

    jobs_max_msgs: int | None = Field(default=None, ge=1)
    jobs_max_bytes: int | None = Field(default=None, ge=1024)
    jobs_max_age_s: float | None = Field(default=None, gt=0)
    results_max_age_s: float | None = Field(default=None, gt=0)
    ack_wait_s: float | None = Field(default=None, gt=0)
    max_deliver: int | None = Field(default=None, ge=1)
    max_ack_pending: int | None = Field(default=None, ge=1)
    workers_ttl_s: float | None = Field(default=None, gt=0)
    # A deployment's property, not the app's: the files in nats/ name no replica count. On one
    # node it must stay 1 (a standalone server refuses R3); on a 3-node cluster it is 3.
    replicas: int | None = Field(
        default=None,
        ge=1,
        le=5,  # JetStream's most (https://docs.nats.io/nats-concepts/jetstream/streams)
        description="copies of every stream, KV bucket and object store; None: new ones get 1 "
        "and existing ones keep theirs",
    )


def _set(target: dict[str, Any], key: str, value: float | None, scale: int = 1) -> None:
    if value is not None:
        target[key] = int(value * scale)


def stream_definitions(limits: Limits) -> dict[str, dict[str, Any]]:
    """The stream configs in the server's JSON format, limits applied."""
    defs = {
        name: _load(f"streams/{name}.json") for name in (JOBS_STREAM, RESULTS_STREAM, DLQ_STREAM)
    }
    _set(defs[JOBS_STREAM], "max_msgs", limits.jobs_max_msgs)
    _set(defs[JOBS_STREAM], "max_bytes", limits.jobs_max_bytes)
    _set(defs[JOBS_STREAM], "max_age", limits.jobs_max_age_s, _NS)
    _set(defs[RESULTS_STREAM], "max_age", limits.results_max_age_s, _NS)
    for definition in defs.values():
        _set(definition, "num_replicas", limits.replicas)
    return defs


def consumer_definition(kind: JobKind, model: str, limits: Limits) -> dict[str, Any]:
    """The durable pull consumer of one model, in the server's JSON format.

    It names no replica count: a durable consumer with ``num_replicas`` 0 takes its stream's,
    so it is R3 on an R3 ``JOBS`` and follows the stream when that is scaled.
    """
    template = copy.deepcopy(_load("consumers/model.json"))
    template.pop("description", None)
    template["durable_name"] = consumer_name(kind, model)
    template["filter_subject"] = job_subject(kind, model)
    _set(template, "ack_wait", limits.ack_wait_s, _NS)
    _set(template, "max_deliver", limits.max_deliver)
    _set(template, "max_ack_pending", limits.max_ack_pending)
    return template


def _differs(
    definition: dict[str, Any], wanted: dict[str, Any], current: dict[str, Any]
) -> list[str]:
    """Keys the definition sets whose value on the server is different (defaults are the server's)."""
    return [k for k, v in wanted.items() if k in definition and current.get(k) != v]


async def _stream_json(js: JetStreamContext, name: str) -> dict[str, Any] | None:
    try:
        info = await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        return None
    return info.config.as_dict()


# What nats-server cannot change on an existing stream: applying it means deleting the stream.
_IMMUTABLE = ("storage", "retention")


async def ensure_stream(
    js: JetStreamContext, definition: dict[str, Any], *, update: bool = True
) -> Change:
    """Create the stream, or (with ``update``) update it when a value we define differs."""
    wanted = StreamConfig.from_response(copy.deepcopy(definition))
    current = await _stream_json(js, definition["name"])
    if current is None:
        await js.add_stream(wanted)
        return "created"
    diff = _differs(definition, wanted.as_dict(), current)
    if not diff or not update:
        return "unchanged"
    if fixed := [k for k in diff if k in _IMMUTABLE]:
        log.warning(
            "stream %s: %s differs but cannot change in place; delete the stream to apply it",
            definition["name"],
            ", ".join(fixed),
        )
        existing = StreamConfig.from_response(dict(current))
        for key in fixed:
            setattr(wanted, key, getattr(existing, key))
        if not (diff := [k for k in diff if k not in _IMMUTABLE]):
            return "unchanged"
    log.info("stream %s: updating %s", definition["name"], ", ".join(diff))
    if wanted.num_replicas is None:
        # An update is a whole config, and a missing count means 1: keep the stream's own, or an
        # update of a limit would scale an R3 stream down.
        wanted.num_replicas = current.get("num_replicas")
    await js.update_stream(wanted)
    return "updated"


async def ensure_consumer(
    js: JetStreamContext, definition: dict[str, Any], *, update: bool = True
) -> Change:
    """Create a model's consumer explicitly; update it only when ``update`` (provisioning)."""
    wanted = ConsumerConfig.from_response(copy.deepcopy(definition))
    wanted.name = wanted.durable_name
    try:
        info = await js.consumer_info(JOBS_STREAM, definition["durable_name"])
    except nats.js.errors.NotFoundError:
        await js.add_consumer(JOBS_STREAM, wanted)
        return "created"
    diff = _differs(definition, wanted.as_dict(), info.config.as_dict())
    if not diff or not update:
        return "unchanged"
    log.info("consumer %s: updating %s", definition["durable_name"], ", ".join(diff))
    await js.add_consumer(JOBS_STREAM, wanted)  # create-or-update on nats-server >= 2.10
    return "updated"


async def ensure_buckets(
    js: JetStreamContext, limits: Limits, *, update: bool = True
) -> dict[str, Change]:
    """Create the ``workers`` and ``options`` KV buckets and the ``images`` object store; apply a
    changed TTL or replica count (with ``update``)."""
    replicas = limits.replicas or 1
    workers = _load("buckets/workers.json")
    ttl_s = limits.workers_ttl_s or workers["ttl"] / _NS
    out: dict[str, Change] = {}
    current = await _stream_json(js, f"KV_{WORKERS_BUCKET}")
    if current is None:
        await js.create_key_value(
            bucket=WORKERS_BUCKET,
            description=workers["description"],
            history=workers["history"],
            ttl=ttl_s,
            storage=workers["storage"],
            replicas=replicas,
        )
        out[WORKERS_BUCKET] = "created"
    elif update and current.get("max_age") != int(ttl_s * _NS):
        cfg = StreamConfig.from_response(dict(current))
        cfg.max_age = ttl_s
        cfg.duplicate_window = min(cfg.duplicate_window or ttl_s, ttl_s)
        await js.update_stream(cfg)
        out[WORKERS_BUCKET] = "updated"
    else:
        out[WORKERS_BUCKET] = "unchanged"
    options = _load("buckets/options.json")
    if await _stream_json(js, f"KV_{OPTIONS_BUCKET}") is None:
        await js.create_key_value(
            bucket=OPTIONS_BUCKET,
            description=options["description"],
            history=options["history"],
            max_value_size=options["max_value_size"],
            storage=options["storage"],
            replicas=replicas,
        )
        out[OPTIONS_BUCKET] = "created"
    else:
        out[OPTIONS_BUCKET] = "unchanged"
    images = _load("buckets/images.json")
    if await _stream_json(js, f"OBJ_{IMAGES_BUCKET}") is None:
        cfg_obj = ObjectStoreConfig(
            description=images["description"],
            ttl=images["ttl"] / _NS,
            storage=images["storage"],
            replicas=replicas,
        )
        await js.create_object_store(IMAGES_BUCKET, config=cfg_obj)
        out[IMAGES_BUCKET] = "created"
    else:
        out[IMAGES_BUCKET] = "unchanged"
    if update and limits.replicas is not None:
        await _apply_replicas(js, limits.replicas, out)
    return out


async def _apply_replicas(js: JetStreamContext, replicas: int, changes: dict[str, Change]) -> None:
    """Scale the buckets that exist with another replica count (a KV bucket or object store is a
    stream, ``KV_<bucket>`` / ``OBJ_<bucket>``, and scales like one)."""
    streams = {
        WORKERS_BUCKET: f"KV_{WORKERS_BUCKET}",
        OPTIONS_BUCKET: f"KV_{OPTIONS_BUCKET}",
        IMAGES_BUCKET: f"OBJ_{IMAGES_BUCKET}",
    }
    for bucket, stream in streams.items():
        current = await _stream_json(js, stream)
        if current is None or current.get("num_replicas") == replicas:
            continue
        log.info("bucket %s: %s -> %d replicas", bucket, current.get("num_replicas"), replicas)
        await js.update_stream(StreamConfig.from_response({**current, "num_replicas": replicas}))
        changes[bucket] = "updated"


async def provision(
    js: JetStreamContext,
    limits: Limits,
    models: Sequence[tuple[JobKind, str]] = (),
    *,
    update: bool = True,
) -> dict[str, Change]:
    """Create or update every stream, bucket and the given models' consumers.

    Without ``update`` only what is missing is created and nothing existing is touched:
    what a process does when it (re)connects to a server that may have lost its state
    (``ensure_present``), so an operator's changes are never clobbered.
    """
    changes: dict[str, Change] = {}
    for name, definition in stream_definitions(limits).items():
        changes[f"stream {name}"] = await ensure_stream(js, definition, update=update)
    for name, change in (await ensure_buckets(js, limits, update=update)).items():
        changes[f"bucket {name}"] = change
    for kind, model in models:
        definition = consumer_definition(kind, model, limits)
        changes[f"consumer {definition['durable_name']}"] = await ensure_consumer(
            js, definition, update=update
        )
    return changes


# While a (re)started server recovers JetStream or a cluster elects its leaders, its API
# answers "temporarily unavailable" (503), times out, or has no responders yet.
_WARMING_UP = (
    nats.js.errors.ServiceUnavailableError,
    nats.errors.NoRespondersError,
    nats.errors.TimeoutError,
    TimeoutError,
)


async def ensure_present(
    js: JetStreamContext,
    models: Sequence[tuple[JobKind, str]] = (),
    *,
    limits: Limits | None = None,
    timeout_s: float = 30.0,
) -> dict[str, Change]:
    """Re-create whatever the server lacks (streams, buckets, these consumers), waiting while
    its JetStream warms up; returns what was created. Idempotent and never updates."""
    deadline = time.monotonic() + timeout_s
    delay = 0.1
    while True:
        try:
            changes = await provision(js, limits or Limits(), models, update=False)
        except _WARMING_UP as e:
            if time.monotonic() + delay > deadline:
                raise
            log.debug("JetStream not ready (%s); retrying", type(e).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
            continue
        created: dict[str, Change] = {k: v for k, v in changes.items() if v == "created"}
        if created:
            log.warning("re-created what the NATS server lacked: %s", ", ".join(created))
        return created
