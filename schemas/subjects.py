"""Subject, stream, bucket and header names: the one place they are spelled.

===========================  =========================================================
``jobs.llm.<model>``         text jobs (``TextJob``) and embedding jobs (``EmbedJob``,
                             ``kind: "embed"``) for a text model, in stream ``JOBS``;
                             one durable consumer ``llm-<model>`` serves both
``jobs.sd.<model>``          image jobs (``ImageJob``), consumer ``sd-<model>``
``results.<job id>``         a job's events (``results.<user>.<job id>`` for a native
                             client), also kept in stream ``RESULTS``
``cancel.<job id>``          stop a job
``rpc.llm.<model>.<op>``     tokenize, detokenize, apply-template, props
``dlq.jobs.<kind>.<model>``  dead letters, in stream ``DLQ``
===========================  =========================================================

Embedding jobs share the text queue on purpose: the same worker, context and slots
compute them (one model copy), so a second consumer would only split one fleet's slots
between two queues. ``queue_kind`` maps a job's ``kind`` to its queue.
"""

from __future__ import annotations

import re
import secrets
from enum import StrEnum
from typing import Literal

JobKind = Literal["llm", "sd"]

JOBS_STREAM = "JOBS"
RESULTS_STREAM = "RESULTS"
DLQ_STREAM = "DLQ"
WORKERS_BUCKET = "workers"
IMAGES_BUCKET = "images"
OPTIONS_BUCKET = "options"

JOBS_PREFIX = "jobs"
RESULTS_PREFIX = "results"
CANCEL_PREFIX = "cancel"
RPC_PREFIX = "rpc"
DLQ_PREFIX = "dlq"
INTERRUPT_PREFIX = "interrupt"
ALIVE_PREFIX = "alive"
FENCE_SUFFIX = "fence"
# A continuation's attempts are numbered from EPOCH_SPAN x its epoch (the original job is
# epoch 0: attempts 1, 2 ... as JetStream counts deliveries), so any attempt of a later
# epoch ranks above every attempt of an earlier one: followers drop what a superseded
# delivery still sends. Larger than any consumer's max_deliver.
EPOCH_SPAN = 1000


class Header(StrEnum):
    """Message headers. Ours never use the reserved ``Nats-`` prefix."""

    MSG_ID = "Nats-Msg-Id"  # JetStream's own: idempotent publish within the duplicate window
    REPLY = "Headrace-Reply"
    DEADLINE = "Headrace-Deadline"
    REQUEST_ID = "Headrace-Request-Id"
    TRACEPARENT = "traceparent"
    JOB = "Headrace-Job"
    SEQ = "Headrace-Seq"
    ATTEMPT = "Headrace-Attempt"
    REASON = "Headrace-Reason"
    OWNER = "Headrace-Owner"  # id (never the secret) of the API key that submitted the job
    EPOCH = "Headrace-Epoch"  # a continuation's epoch (absent: 0, the job as first published)
    RESUMED_AFTER = "Headrace-Resumed-After"  # the last event (attempt-seq) it continues
    LEAVING = "Headrace-Leaving"  # on a worker's last beat: it stopped; hand the job over


_UNSAFE = re.compile(r"[^a-z0-9_-]+")


def model_slug(model: str) -> str:
    """Turn a model id into one subject token that is also a valid consumer name."""
    slug = _UNSAFE.sub("-", model.strip().lower()).strip("-")
    if not slug:
        raise ValueError(f"model id {model!r} has no subject-safe characters")
    return slug


def new_job_id() -> str:
    """A fresh job id: 128 random bits in hex, unguessable and subject-safe."""
    return secrets.token_hex(16)


_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


def is_job_id(value: str) -> bool:
    """True when ``value`` could be a job id (subject-safe, long enough to be unguessable)."""
    return bool(_JOB_ID.match(value))


def job_subject(kind: JobKind, model: str, region: str | None = None) -> str:
    """Where jobs for ``model`` are published: ``jobs.<kind>.<slug>``, or in a super-cluster
    ``jobs.<kind>.<slug>.<region>`` (captured by that region's ``JOBS_<region>``)."""
    subject = f"{JOBS_PREFIX}.{kind}.{model_slug(model)}"
    return subject if region is None else f"{subject}.{check_region(region)}"


# A region is a NATS cluster of a super-cluster: its name is the cluster's and the gateway's,
# and it suffixes stream names (JOBS_<region>) and ends job subjects: one lower-case token,
# no underscore (so JOBS_<region> reads back unambiguously).
_REGION = re.compile(r"^[a-z][a-z0-9-]{0,23}$")


# The JetStream domain of a super-cluster (nats/region.conf): a leaf node without JetStream
# reaches the regions' JetStream through $JS.<domain>.API.> (nats/leaf/leaf.conf maps to it).
JS_DOMAIN = "headrace"


def is_region(name: str) -> bool:
    """True when ``name`` can name a region."""
    return bool(_REGION.match(name))


def check_region(name: str) -> str:
    """``name`` when it can name a region; ValueError otherwise."""
    if not is_region(name):
        raise ValueError(
            f"{name!r} cannot name a region (lower-case letters, digits and '-', "
            "starting with a letter, at most 24)"
        )
    return name


def parse_regions(text: str) -> tuple[str, ...]:
    """A comma-separated region list (``HEADRACE_REGIONS``), checked, in order, no repeats."""
    names = [check_region(n.strip()) for n in text.split(",") if n.strip()]
    if len(set(names)) != len(names):
        raise ValueError(f"regions repeat: {text!r}")
    return tuple(names)


def jobs_stream(region: str | None = None) -> str:
    """The job queue: ``JOBS``, or a region's own ``JOBS_<region>`` (placed in its cluster)."""
    return JOBS_STREAM if region is None else f"{JOBS_STREAM}_{check_region(region)}"


def results_stream(region: str | None = None) -> str:
    """The result replay buffer: ``RESULTS``, or ``RESULTS_<region>`` of the submitter's region."""
    return RESULTS_STREAM if region is None else f"{RESULTS_STREAM}_{check_region(region)}"


def dlq_stream(region: str | None = None) -> str:
    """Dead letters: ``DLQ``, or ``DLQ_<region>`` of the region whose queue held the job."""
    return DLQ_STREAM if region is None else f"{DLQ_STREAM}_{check_region(region)}"


def workers_bucket(region: str | None = None) -> str:
    """The worker registry: ``workers``, or ``workers_<region>`` of the region's workers."""
    return WORKERS_BUCKET if region is None else f"{WORKERS_BUCKET}_{check_region(region)}"


def queue_kind(job_kind: str) -> JobKind:
    """The queue a job of ``job_kind`` travels on: an embedding job (``EmbedJob``, kind
    ``embed``) rides its model's text queue, ``jobs.llm.<model>``, so text and embedding
    jobs share one consumer, one fleet of slots and one engine per model."""
    return "sd" if job_kind == "sd" else "llm"


def consumer_name(kind: JobKind, model: str) -> str:
    """The durable pull consumer shared by every worker of ``model``."""
    return f"{kind}-{model_slug(model)}"


_NATS_USER = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


def is_nats_user(name: str) -> bool:
    """True when ``name`` can be a NATS user: one lower-case subject token (it prefixes the
    user's reply subjects and inboxes)."""
    return bool(_NATS_USER.match(name))


def results_subject(job_id: str, user: str | None = None, region: str | None = None) -> str:
    """A job's reply subject: ``results.<job id>`` (the edge), or ``results.<user>.<job id>``
    for a NATS-native client, whose permissions allow only its own prefix.

    In a super-cluster the submitter's region comes first, ``results.<region>.<job id>`` or
    ``results.<region>.<user>.<job id>``: ``RESULTS_<region>`` captures them, in the region
    that reads them back.
    """
    head = RESULTS_PREFIX if region is None else f"{RESULTS_PREFIX}.{check_region(region)}"
    if user is None:
        return f"{head}.{job_id}"
    if not is_nats_user(user):
        raise ValueError(f"{user!r} cannot be a NATS user (one lower-case subject token)")
    return f"{head}.{user}.{job_id}"


def is_reply_subject(reply: str, job_id: str, regions: bool = False) -> bool:
    """True when ``reply`` is one of ``results_subject``'s shapes for this job id (with
    ``regions``: a super-cluster's, which may add a region token).

    Workers publish only there: a reply naming any other subject would have a worker publish,
    with its own permissions, wherever a job's submitter chose.
    """
    head, _, last = reply.rpartition(".")
    if last != job_id or not is_job_id(job_id):
        return False
    prefix, *middle = head.split(".")
    if prefix != RESULTS_PREFIX or not all(map(is_nats_user, middle)):
        return False
    if not regions:  # results.<id>, results.<user>.<id>
        return len(middle) <= 1
    # results.<region>.<id>, results.<region>.<user>.<id>: RESULTS_<region> captures them
    return 1 <= len(middle) <= 2 and is_region(middle[0])


def reply_region(reply: str) -> str:
    """In a super-cluster, the submitter's region a reply subject names (checked by
    ``is_reply_subject(..., regions=True)``): its RESULTS holds the job's events and fence."""
    return reply.split(".")[1]


def reply_results_stream(reply: str, regions: bool) -> str:
    """The stream that captures a (checked) reply subject: ``RESULTS``, or with ``regions``
    ``RESULTS_<region>`` of the region it names."""
    return results_stream(reply_region(reply) if regions else None)


def alive_subject(reply: str) -> str:
    """Where the worker running a job beats while it holds it (core NATS, never stored):
    ``alive.<job id>`` or ``alive.<user>.<job id>`` for the reply ``results.[<user>.]<job id>``
    (in a super-cluster ``alive.<region>.[<user>.]<job id>``)."""
    return f"{ALIVE_PREFIX}.{reply.partition('.')[2]}"


def fence_subject(reply: str) -> str:
    """The job's fence in RESULTS: its last message names the lowest epoch still allowed to
    run (``results.[<user>.]<job id>.fence``; in a super-cluster
    ``results.<region>.[<user>.]<job id>.fence``, in ``RESULTS_<region>`` of the submitter)."""
    return f"{reply}.{FENCE_SUFFIX}"


def attempt_number(epoch: int, delivered: int) -> int:
    """The attempt number of a message's ``delivered``-th delivery in ``epoch``."""
    return epoch * EPOCH_SPAN + min(max(delivered, 1), EPOCH_SPAN - 1)


def epoch_of(attempt: int) -> int:
    """The epoch an attempt number belongs to."""
    return attempt // EPOCH_SPAN


def continuation_msg_id(job_id: str, epoch: int) -> str:
    """The ``Nats-Msg-Id`` of a job's continuation in ``epoch``: JOBS keeps one per epoch
    however many followers publish it."""
    return f"{job_id}.{epoch}"


def inbox_prefix(user: str) -> str:
    """Where a NATS user's request replies arrive (``_INBOX.<user>.>``): its permissions let
    it subscribe to its own inboxes only, so nobody reads another user's replies."""
    return f"_INBOX.{user}"


def cancel_subject(job_id: str) -> str:
    """Publishing anything here asks the worker to stop the job."""
    return f"{CANCEL_PREFIX}.{job_id}"


CANCEL_ALL = f"{CANCEL_PREFIX}.*"


def interrupt_subject(key_id: str) -> str:
    """Edges tell each other to stop an API key's image tasks (A1111's interrupt) here."""
    return f"{INTERRUPT_PREFIX}.{key_id}"


INTERRUPT_ALL = f"{INTERRUPT_PREFIX}.*"


def rpc_subject(model: str, op: str) -> str:
    """Request/reply operations a worker answers for a text model (tokenize, props ...)."""
    return f"{RPC_PREFIX}.llm.{model_slug(model)}.{op}"


def dlq_subject(job_subject_: str) -> str:
    """Dead letters keep their original subject under ``dlq.``."""
    return f"{DLQ_PREFIX}.{job_subject_}"


def worker_key(worker_id: str) -> str:
    """The key of a worker's heartbeat in the ``workers`` bucket."""
    return model_slug(worker_id)


_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


def trace_id(traceparent: str | None) -> str | None:
    """The trace id of a W3C ``traceparent`` header, for log lines; None when absent or malformed."""
    match = _TRACEPARENT.match(traceparent or "")
    return match.group(1) if match else None
