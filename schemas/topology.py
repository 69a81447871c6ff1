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
from nats.js.api import (
    ConsumerConfig,
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    Placement,
    StreamConfig,
)
from pydantic import BaseModel, Field

from schemas.subjects import (
    DLQ_PREFIX,
    DLQ_STREAM,
    IMAGES_BUCKET,
    JOBS_PREFIX,
    JOBS_STREAM,
    OPTIONS_BUCKET,
    RESULTS_PREFIX,
    RESULTS_STREAM,
    WORKERS_BUCKET,
    JobKind,
    check_region,
    consumer_name,
    dlq_stream,
    job_subject,
    jobs_stream,
    results_stream,
    workers_bucket,
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


def stream_definitions(limits: Limits, region: str | None = None) -> dict[str, dict[str, Any]]:
    """The stream configs in the server's JSON format, limits applied, by stream name.

    With a ``region`` (a super-cluster): that region's own ``JOBS_<region>``,
    ``RESULTS_<region>`` and ``DLQ_<region>``, each capturing only the region's subjects and
    placed in the region's cluster (``placement.cluster``), so a region's queue, its result
    replay and its dead letters live, and fail, with it.
    """
    jobs, results, dlq = (
        _load(f"streams/{n}.json") for n in (JOBS_STREAM, RESULTS_STREAM, DLQ_STREAM)
    )
    _set(jobs, "max_msgs", limits.jobs_max_msgs)
    _set(jobs, "max_bytes", limits.jobs_max_bytes)
    _set(jobs, "max_age", limits.jobs_max_age_s, _NS)
    _set(results, "max_age", limits.results_max_age_s, _NS)
    if region is not None:
        check_region(region)
        jobs["subjects"] = [f"{JOBS_PREFIX}.*.*.{region}"]
        results["subjects"] = [f"{RESULTS_PREFIX}.{region}.>"]
        dlq["subjects"] = [f"{DLQ_PREFIX}.{JOBS_PREFIX}.*.*.{region}"]
        for definition, name in ((jobs, jobs_stream), (results, results_stream), (dlq, dlq_stream)):
            definition["name"] = name(region)
            definition["placement"] = {"cluster": region}
            definition["description"] += f" Region {region}."
    defs = {d["name"]: d for d in (jobs, results, dlq)}
    for definition in defs.values():
        _set(definition, "num_replicas", limits.replicas)
    return defs


def consumer_definition(
    kind: JobKind, model: str, limits: Limits, region: str | None = None
) -> dict[str, Any]:
    """The durable pull consumer of one model, in the server's JSON format.

    It names no replica count: a durable consumer with ``num_replicas`` 0 takes its stream's,
    so it is R3 on an R3 ``JOBS`` and follows the stream when that is scaled. With a
    ``region`` it filters that region's subject (it lives on ``JOBS_<region>``).
    """
    template = copy.deepcopy(_load("consumers/model.json"))
    template.pop("description", None)
    template["durable_name"] = consumer_name(kind, model)
    template["filter_subject"] = job_subject(kind, model, region)
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
    js: JetStreamContext,
    definition: dict[str, Any],
    *,
    update: bool = True,
    stream: str = JOBS_STREAM,
) -> Change:
    """Create a model's consumer explicitly; update it only when ``update`` (provisioning)."""
    wanted = ConsumerConfig.from_response(copy.deepcopy(definition))
    wanted.name = wanted.durable_name
    try:
        info = await js.consumer_info(stream, definition["durable_name"])
    except nats.js.errors.NotFoundError:
        await js.add_consumer(stream, wanted)
        return "created"
    diff = _differs(definition, wanted.as_dict(), info.config.as_dict())
    if not diff or not update:
        return "unchanged"
    log.info("consumer %s: updating %s", definition["durable_name"], ", ".join(diff))
    await js.add_consumer(stream, wanted)  # create-or-update on nats-server >= 2.10
    return "updated"


async def ensure_buckets(
    js: JetStreamContext,
    limits: Limits,
    *,
    update: bool = True,
    region: str | None = None,
    home: str | None = None,
) -> dict[str, Change]:
    """Create the ``workers`` and ``options`` KV buckets and the ``images`` object store; apply a
    changed TTL or replica count (with ``update``).

    With a ``region``: its own registry ``workers_<region>``, placed in its cluster, and the
    shared ``options`` and ``images`` only when ``home`` names the region they live in.
    """
    replicas = limits.replicas or 1
    workers = _load("buckets/workers.json")
    ttl_s = limits.workers_ttl_s or workers["ttl"] / _NS
    out: dict[str, Change] = {}
    registry = workers_bucket(region)
    here = None if region is None else Placement(cluster=region)
    current = await _stream_json(js, f"KV_{registry}")
    if current is None:
        await _create_kv(
            js,
            KeyValueConfig(
                bucket=registry,
                description=workers["description"],
                history=workers["history"],
                ttl=ttl_s,
                storage=workers["storage"],
                replicas=replicas,
                placement=here,
            ),
        )
        out[registry] = "created"
    elif update and current.get("max_age") != int(ttl_s * _NS):
        cfg = StreamConfig.from_response(dict(current))
        cfg.max_age = ttl_s
        cfg.duplicate_window = min(cfg.duplicate_window or ttl_s, ttl_s)
        await js.update_stream(cfg)
        out[registry] = "updated"
    else:
        out[registry] = "unchanged"
    shared = region is None or home is not None
    where = None if home is None else Placement(cluster=check_region(home))
    if shared:
        options = _load("buckets/options.json")
        if await _stream_json(js, f"KV_{OPTIONS_BUCKET}") is None:
            await _create_kv(
                js,
                KeyValueConfig(
                    bucket=OPTIONS_BUCKET,
                    description=options["description"],
                    history=options["history"],
                    max_value_size=options["max_value_size"],
                    storage=options["storage"],
                    replicas=replicas,
                    placement=where,
                ),
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
                placement=where,
            )
            await js.create_object_store(IMAGES_BUCKET, config=cfg_obj)
            out[IMAGES_BUCKET] = "created"
        else:
            out[IMAGES_BUCKET] = "unchanged"
    if update and limits.replicas is not None:
        await _apply_replicas(js, limits.replicas, out, registry, shared)
    return out


async def _create_kv(js: JetStreamContext, config: KeyValueConfig) -> None:
    """``js.create_key_value``, but placed: nats-py (2.x) drops ``placement`` from the stream
    it makes, so an unplaced bucket is made its way and a placed one is made here, as the
    same ``KV_<bucket>`` stream with the placement added."""
    if config.placement is None:
        await js.create_key_value(config)
        return
    ttl = config.ttl
    await js.add_stream(
        StreamConfig(
            name=f"KV_{config.bucket}",
            description=config.description,
            subjects=[f"$KV.{config.bucket}.>"],
            allow_direct=config.direct,
            allow_rollup_hdrs=True,
            allow_msg_ttl=True,
            deny_delete=True,
            discard=DiscardPolicy.NEW,
            duplicate_window=min(120.0, ttl) if ttl else 120.0,
            max_age=ttl,
            max_bytes=config.max_bytes,
            max_consumers=-1,
            max_msg_size=config.max_value_size,
            max_msgs=-1,
            max_msgs_per_subject=config.history,
            num_replicas=config.replicas,
            storage=config.storage,
            placement=config.placement,
        )
    )


async def _apply_replicas(
    js: JetStreamContext,
    replicas: int,
    changes: dict[str, Change],
    registry: str = WORKERS_BUCKET,
    shared: bool = True,
) -> None:
    """Scale the buckets that exist with another replica count (a KV bucket or object store is a
    stream, ``KV_<bucket>`` / ``OBJ_<bucket>``, and scales like one)."""
    streams = {registry: f"KV_{registry}"}
    if shared:
        streams |= {OPTIONS_BUCKET: f"KV_{OPTIONS_BUCKET}", IMAGES_BUCKET: f"OBJ_{IMAGES_BUCKET}"}
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
    region: str | None = None,
    home: str | None = None,
) -> dict[str, Change]:
    """Create or update every stream, bucket and the given models' consumers.

    Without ``update`` only what is missing is created and nothing existing is touched:
    what a process does when it (re)connects to a server that may have lost its state
    (``ensure_present``), so an operator's changes are never clobbered.

    With a ``region`` (a super-cluster) that region's streams, registry and consumers, and
    with ``home`` the shared buckets too (see ``ensure_buckets``). A region that is no cluster
    of the super-cluster raises ``UnknownRegion``.
    """
    changes: dict[str, Change] = {}
    try:
        for name, definition in stream_definitions(limits, region).items():
            changes[f"stream {name}"] = await ensure_stream(js, definition, update=update)
        buckets = await ensure_buckets(js, limits, update=update, region=region, home=home)
    except nats.js.errors.APIError as e:
        if e.err_code == _NO_PLACEMENT:
            where = (
                region
                if region is not None and not any(k.startswith("stream") for k in changes)
                else home
            )
            raise UnknownRegion(
                f"region {where!r} is not a cluster of this NATS super-cluster (no server "
                "can hold its streams): check the region name and the gateways"
            ) from e
        raise
    for name, change in buckets.items():
        changes[f"bucket {name}"] = change
    for kind, model in models:
        definition = consumer_definition(kind, model, limits, region)
        changes[f"consumer {definition['durable_name']}"] = await ensure_consumer(
            js, definition, update=update, stream=jobs_stream(region)
        )
    return changes


# nats-server's JSClusterNoPeersErrF: "no suitable peers for placement".
_NO_PLACEMENT = 10005


class UnknownRegion(ValueError):
    """A region that no cluster of the super-cluster answers to: retrying cannot help."""


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
    region: str | None = None,
    home: str | None = None,
) -> dict[str, Change]:
    """Re-create whatever the server lacks (streams, buckets, these consumers), waiting while
    its JetStream warms up; returns what was created. Idempotent and never updates. With a
    ``region``: that region's (``provision``); an unknown one raises ``UnknownRegion``."""
    deadline = time.monotonic() + timeout_s
    delay = 0.1
    while True:
        try:
            changes = await provision(
                js, limits or Limits(), models, update=False, region=region, home=home
            )
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
