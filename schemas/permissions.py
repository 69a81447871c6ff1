"""What each NATS user may publish and subscribe to: least privilege per role.

One account holds every user (all roles share the same streams; separate accounts would
need an export and an import per subject and give nothing that subject permissions do not).
The roles:

* ``admin``: the JetStream API, nothing else (``headrace provision``, ``headrace up``).
* ``edge``: publishes jobs, cancels, interrupts and rpc requests; reads the results of
  edge jobs (``results.<job id>``), the ``workers`` and ``options`` buckets and images.
* ``worker``: fetches from and acks the JOBS consumers, publishes results, dead letters,
  heartbeats and per-job beats, answers rpc requests. It publishes no job (a stopped
  worker's jobs are continued by their followers, ``schemas.failover``). It
  reads no result: no subscribe permission on ``results.>``, no consumer on RESULTS; only
  the fence of a redelivered job (``results.[<user>.]<job id>.fence``, by direct get).
* ``observer``: read-only JetStream information and the ``workers`` bucket (``headrace
  status``, dashboards).
* a native client ``<user>``: publishes jobs for its allowed models and reads only
  ``results.<user>.>``, live or from RESULTS (see ``schemas.subjects.results_subject``).

Every user subscribes to its own inboxes only (``_INBOX.<user>.>``, set by
``schemas.connection.connect``), so no user reads another's request replies. Subjects come
from the nats-server JetStream API reference: a pull consumer needs
``$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`` and ``$JS.ACK.<stream>.<consumer>.>``;
a KV get ``$JS.API.DIRECT.GET.KV_<bucket>.>`` (or ``STREAM.MSG.GET``), a KV put a publish
to ``$KV.<bucket>.<key>``; an object store ``$O.<bucket>.>`` and its stream's API.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from schemas.subjects import (
    ALIVE_PREFIX,
    CANCEL_PREFIX,
    DLQ_PREFIX,
    FENCE_SUFFIX,
    IMAGES_BUCKET,
    INTERRUPT_PREFIX,
    JOBS_PREFIX,
    JS_DOMAIN,
    OPTIONS_BUCKET,
    RESULTS_PREFIX,
    RESULTS_STREAM,
    RPC_PREFIX,
    WORKERS_BUCKET,
    dlq_stream,
    inbox_prefix,
    is_nats_user,
    jobs_stream,
    model_slug,
    parse_regions,
    results_stream,
    workers_bucket,
)

ADMIN, EDGE, WORKER, OBSERVER = "admin", "edge", "worker", "observer"
ROLES = (ADMIN, EDGE, WORKER, OBSERVER)
ALL_MODELS = "*"

API = "$JS.API"
_KV_WORKERS = f"KV_{WORKERS_BUCKET}"
_KV_OPTIONS = f"KV_{OPTIONS_BUCKET}"
_OBJ_IMAGES = f"OBJ_{IMAGES_BUCKET}"


@dataclass(frozen=True)
class Permissions:
    """Subjects a user may publish and subscribe to (everything else is denied)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False  # may publish one reply to a request it received

    def as_config(self) -> dict[str, object]:
        """The ``permissions`` map of a user in nats-server's configuration."""
        out: dict[str, object] = {
            "publish": {"allow": list(self.publish)},
            "subscribe": {"allow": list(self.subscribe)},
        }
        if self.allow_responses:
            out["allow_responses"] = True
        return out


def _kv_read(stream: str) -> list[str]:
    """Get and watch a KV bucket: its stream's info, direct and stored gets, an ordered
    consumer (nats-py creates it unnamed, so the filter is in the body: any consumer on this
    one stream) and its flow control replies."""
    return [
        f"{API}.STREAM.INFO.{stream}",
        f"{API}.DIRECT.GET.{stream}.>",
        f"{API}.STREAM.MSG.GET.{stream}",
        f"{API}.CONSUMER.CREATE.{stream}",
        f"{API}.CONSUMER.CREATE.{stream}.>",
        f"{API}.CONSUMER.INFO.{stream}.*",
        f"{API}.CONSUMER.DELETE.{stream}.*",
        f"$JS.FC.{stream}.>",
    ]


def _images() -> list[str]:
    """Read and write the ``images`` object store: chunks and metadata under ``$O.images.>``,
    the purge a put does when it replaces an object, and stream names: nats-py looks the
    chunks' stream up by subject (this lists names only, no configuration or message)."""
    return [
        f"$O.{IMAGES_BUCKET}.>",
        f"{API}.STREAM.PURGE.{_OBJ_IMAGES}",
        f"{API}.STREAM.NAMES",
        *_kv_read(_OBJ_IMAGES),
    ]


Regions = Sequence[str]  # a super-cluster's regions; empty: one region, the classic names


def _scopes(regions: Regions) -> list[str | None]:
    """The region of each set of names: ``[None]`` (JOBS, RESULTS ...) or every region's."""
    return list(parse_regions(",".join(regions))) if regions else [None]


def _history(results: str, stream: str = RESULTS_STREAM) -> list[str]:
    """Read a job's events back from RESULTS. The consumer's filter is part of the create
    subject (``CONSUMER.CREATE.<stream>.<name>.<filter>``, which nats-py uses for named
    consumers), so the permission bounds what the consumer can read. Fetching and deleting
    name the consumer only: its name is a random NUID nobody else learns."""
    return [
        f"{API}.CONSUMER.CREATE.{stream}.*.{results}",
        f"{API}.CONSUMER.MSG.NEXT.{stream}.*",
        f"{API}.CONSUMER.DELETE.{stream}.*",
    ]


def _topology(regions: Regions = ()) -> list[str]:
    """Look up and create the streams and buckets (``schemas.topology.ensure_present``): the
    edge and workers re-create what a restarted or replaced server lacks. Broader than serving
    needs, but bounded: these names only, no update, purge or delete, and the server refuses a
    create whose configuration differs from an existing stream's, so an operator's limits
    stand."""
    names = [_KV_OPTIONS, _OBJ_IMAGES]
    for r in _scopes(regions):
        names += [jobs_stream(r), results_stream(r), dlq_stream(r), f"KV_{workers_bucket(r)}"]
    return [f"{API}.STREAM.{verb}.{name}" for name in names for verb in ("INFO", "CREATE")]


def _in_domain(permissions: Permissions, regions: Regions) -> Permissions:
    """In a super-cluster, each JetStream API grant also under the regions' domain
    (``$JS.<domain>.API``): what a process behind a leaf node calls (nats/leaf/leaf.conf)."""
    if not regions:
        return permissions
    prefix, domain = f"{API}.", f"$JS.{JS_DOMAIN}.API."
    extra = [domain + p[len(prefix) :] for p in permissions.publish if p.startswith(prefix)]
    # nats-server keeps $KV.> off a leaf link; a KV put crosses as $JS.<domain>.API.$KV.>.
    extra += [domain + p for p in permissions.publish if p.startswith("$KV.")]
    return Permissions(
        publish=(*permissions.publish, *extra),
        subscribe=permissions.subscribe,
        allow_responses=permissions.allow_responses,
    )


def admin() -> Permissions:
    """Provisioning: the whole JetStream API (streams, consumers, buckets), no data subjects."""
    return Permissions(publish=(f"{API}.>",), subscribe=(f"{inbox_prefix(ADMIN)}.>",))


def edge(regions: Regions = ()) -> Permissions:
    """The HTTP edge (in a super-cluster: of any region, placing jobs in every region)."""
    publish = [
        f"{JOBS_PREFIX}.>",  # continuations too (schemas.failover)
        f"{CANCEL_PREFIX}.*",
        f"{INTERRUPT_PREFIX}.*",
        f"{RPC_PREFIX}.>",
        f"$KV.{OPTIONS_BUCKET}.>",
        *_topology(regions),
        *_kv_read(_KV_OPTIONS),
        *_images(),
    ]
    subscribe = [f"{INTERRUPT_PREFIX}.*", f"{inbox_prefix(EDGE)}.>"]
    for r in _scopes(regions):
        jobs = jobs_stream(r)
        # Edge jobs reply on results.<job id> (results.<region>.<job id>): one token after
        # the prefix, so native clients' results (results[.<region>].<user>.<job id>) stay
        # out of the edge's reach.
        own = f"{RESULTS_PREFIX}.*" if r is None else f"{RESULTS_PREFIX}.{r}.*"
        publish += [
            f"{own}.{FENCE_SUFFIX}",  # the fence of a job it hands over (schemas.failover)
            # readiness, queue depth and the fleet's check that a model's consumer exists
            f"{API}.CONSUMER.INFO.{jobs}.*",
            # After a reconnect, JobClient.queued reads a job back by sequence to see whether
            # the broker still holds it. Broader than that: any job in JOBS, by sequence (the
            # edge wrote most of them; native clients' jobs too). Native clients do not get it.
            f"{API}.STREAM.MSG.GET.{jobs}",
            f"{API}.CONSUMER.LIST.{jobs}",
            *_history(own, results_stream(r)),
            *_kv_read(f"KV_{workers_bucket(r)}"),
        ]
        if r is not None:
            # A job handed over away from a lost region is deleted from that region's queue
            # once it is back (edge.placement; its fence would stop it anyway).
            publish.append(f"{API}.STREAM.MSG.DELETE.{jobs}")
        # its jobs' results, and the beats of the workers running them
        subscribe += [own, f"{ALIVE_PREFIX}.*" if r is None else f"{ALIVE_PREFIX}.{r}.*"]
    return Permissions(publish=tuple(publish), subscribe=tuple(subscribe))


def worker(regions: Regions = ()) -> Permissions:
    """A worker of any engine (in a super-cluster: of any region)."""
    publish = [
        f"{RESULTS_PREFIX}.>",
        f"{ALIVE_PREFIX}.>",  # a held job's beats
        f"{DLQ_PREFIX}.>",
        *_topology(regions),
        *_images(),
    ]
    for r in _scopes(regions):
        jobs = jobs_stream(r)
        # A redelivered job's fence, the one result subject it reads (schemas.failover): in
        # the RESULTS of the job's submitter's region, whichever region's queue held the job.
        results, head = results_stream(r), RESULTS_PREFIX if r is None else f"{RESULTS_PREFIX}.{r}"
        publish += [
            f"{API}.DIRECT.GET.{results}.{head}.*.{FENCE_SUFFIX}",
            f"{API}.DIRECT.GET.{results}.{head}.*.*.{FENCE_SUFFIX}",
            # In a super-cluster ">": the grant that a hub holds a leaf node's interest to
            # must cover the bucket stream's own subject ($KV.<bucket>.>) for the leaf to
            # learn where heartbeats go. A worker key is one token either way.
            f"$KV.{workers_bucket(r)}.{'*' if r is None else '>'}",
            # A worker creates its model's consumer when it is missing (never updates it),
            # binds it, fetches from it and acks: JOBS only.
            f"{API}.CONSUMER.CREATE.{jobs}.*.{JOBS_PREFIX}.>",
            f"{API}.CONSUMER.INFO.{jobs}.*",
            f"{API}.CONSUMER.MSG.NEXT.{jobs}.*",
            f"$JS.ACK.{jobs}.>",
        ]
    subscribe = [f"{CANCEL_PREFIX}.*", f"{RPC_PREFIX}.>", f"{inbox_prefix(WORKER)}.>"]
    # allow_responses: the rpc answer goes to the requester's inbox, which no grant names.
    return Permissions(publish=tuple(publish), subscribe=tuple(subscribe), allow_responses=True)


def observer(regions: Regions = ()) -> Permissions:
    """``headrace status`` and dashboards: stream, consumer and account information, and the
    worker registry. Stream info can list a stream's subjects (job ids among them) but no
    message: the observer reads no job, result or image."""
    publish = [
        f"{API}.INFO",
        f"{API}.STREAM.NAMES",
        f"{API}.STREAM.LIST",
        f"{API}.STREAM.INFO.*",
        f"{API}.CONSUMER.NAMES.*",
        f"{API}.CONSUMER.LIST.*",
        f"{API}.CONSUMER.INFO.*.*",
        *(p for r in _scopes(regions) for p in _kv_read(f"KV_{workers_bucket(r)}")),
    ]
    return Permissions(publish=tuple(publish), subscribe=(f"{inbox_prefix(OBSERVER)}.>",))


def native_client(user: str, models: Iterable[str], regions: Regions = ()) -> Permissions:
    """A NATS-native client: jobs for ``models`` (``*``: every model), its own results only.

    Cancels are ``cancel.<job id>`` for any id: a job id is 128 random bits that only its
    submitter (and the workers) ever see. Images above the inline limit travel through the
    object store, whose API cannot be narrowed to one client's objects: native clients get
    none of it and must keep images inline.
    """
    if not is_nats_user(user) or user in ROLES:
        raise ValueError(f"{user!r} cannot name a native client (one lower-case token, no role)")
    # In a super-cluster a job subject ends with its region: jobs.<kind>.<model>.<region>.
    tail = ".*" if regions else ""
    jobs = sorted({f"{JOBS_PREFIX}.>" if m == ALL_MODELS else f"{JOBS_PREFIX}.*.{model_slug(m)}{tail}"
                   for m in models})  # fmt: skip
    if not jobs:
        raise ValueError(f"native client {user!r} is allowed no model")
    publish = [*jobs, f"{CANCEL_PREFIX}.*"]
    subscribe = [f"{inbox_prefix(user)}.>"]
    for r in _scopes(regions):
        head = RESULTS_PREFIX if r is None else f"{RESULTS_PREFIX}.{r}"
        own = f"{head}.{user}.>"
        fences = f"{head}.{user}.*.{FENCE_SUFFIX}"  # of the jobs it hands over
        publish += [fences, *_history(own, results_stream(r))]
        beats = f"{ALIVE_PREFIX}.{user}.>" if r is None else f"{ALIVE_PREFIX}.{r}.{user}.>"
        subscribe += [own, beats]
    return _in_domain(Permissions(publish=tuple(publish), subscribe=tuple(subscribe)), regions)


def for_role(role: str, regions: Regions = ()) -> Permissions:
    """The permissions of one of ``ROLES`` (in a super-cluster of ``regions``)."""
    if role == ADMIN:
        return admin()
    return _in_domain({EDGE: edge, WORKER: worker, OBSERVER: observer}[role](regions), regions)
