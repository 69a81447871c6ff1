"""Export the JSON Schema of every message into ``schemas/json/`` for non-Python clients."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson
from pydantic import TypeAdapter

from schemas.events import Event
from schemas.fleet import WorkerInfo
from schemas.jobs import EmbedJob, ImageJob, Job, JobHeaders, TextJob

JSON_DIR = Path(__file__).with_name("json")

MESSAGES: dict[str, Any] = {
    "job": Job,
    "text-job": TextJob,
    "image-job": ImageJob,
    "embed-job": EmbedJob,
    "job-headers": JobHeaders,
    "event": Event,
    "worker-info": WorkerInfo,
}


def render() -> dict[str, bytes]:
    """The schema files, by file name, exactly as they are committed."""
    out = {}
    for name, tp in MESSAGES.items():
        schema = TypeAdapter(tp).json_schema(mode="serialization")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"https://headrace.dev/schemas/{name}.json"
        out[f"{name}.json"] = (
            orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
        )
    return out


def write(directory: Path = JSON_DIR) -> list[Path]:
    """Write every schema file; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, body in render().items():
        path = directory / name
        path.write_bytes(body)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write():
        sys.stdout.write(f"wrote {p}\n")
