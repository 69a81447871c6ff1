"""The wire contract of headrace: jobs, result events, names, errors and a small client."""

from schemas.client import JobClient, JobStream, Position, Received
from schemas.codec import decode_event, decode_job, encode
from schemas.errors import ErrorCode, HeadraceError
from schemas.events import (
    Delta,
    Done,
    Embeddings,
    Error,
    Event,
    Progress,
    Started,
    Timings,
    Usage,
)
from schemas.jobs import (
    ChatMessage,
    EmbedJob,
    EmbedParams,
    ImageJob,
    ImageParams,
    Job,
    TextJob,
    TextParams,
)

__all__ = [
    "ChatMessage",
    "Delta",
    "Done",
    "EmbedJob",
    "EmbedParams",
    "Embeddings",
    "Error",
    "ErrorCode",
    "Event",
    "HeadraceError",
    "ImageJob",
    "ImageParams",
    "Job",
    "JobClient",
    "JobStream",
    "Position",
    "Progress",
    "Received",
    "Started",
    "TextJob",
    "TextParams",
    "Timings",
    "Usage",
    "decode_event",
    "decode_job",
    "encode",
]
