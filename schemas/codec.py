"""Bytes on the wire: orjson for speed, pydantic for validation."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel, TypeAdapter, ValidationError

from schemas.errors import Poison
from schemas.events import Event
from schemas.fleet import WorkerInfo
from schemas.jobs import AnyJob, Job

_JOB: TypeAdapter[AnyJob] = TypeAdapter(Job)
_EVENT: TypeAdapter[Any] = TypeAdapter(Event)


def encode(model: BaseModel) -> bytes:
    """Serialise a wire model, leaving out unset optional fields."""
    return orjson.dumps(model.model_dump(mode="json", exclude_none=True))


def decode_job(data: bytes) -> AnyJob:
    """Parse a job message; anything unparseable or schema-invalid is ``Poison``."""
    try:
        return _JOB.validate_python(orjson.loads(data))
    except orjson.JSONDecodeError as e:
        raise Poison(f"job is not JSON: {e}") from e
    except ValidationError as e:
        raise Poison(f"job does not match the schema: {_first_error(e)}") from e


def decode_event(data: bytes) -> Any:
    """Parse a result event (returns one of the ``schemas.events`` classes)."""
    return _EVENT.validate_python(orjson.loads(data))


def decode_worker(data: bytes) -> WorkerInfo:
    """Parse a heartbeat record from the ``workers`` bucket."""
    return WorkerInfo.model_validate(orjson.loads(data))


def _first_error(e: ValidationError) -> str:
    err = e.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(p) for p in err["loc"]) or "body"
    return f"{where}: {err['msg']}"
