"""The wire contract: names, ids, validation, and the committed JSON Schemas."""

from __future__ import annotations

import pytest

from schemas import jsonschema
from schemas.client import Position
from schemas.codec import decode_event, decode_job, encode
from schemas.errors import ErrorCode, Poison, QueueFull, error_from_code
from schemas.events import Delta, Done, Usage
from schemas.subjects import (
    consumer_name,
    dlq_subject,
    is_job_id,
    job_subject,
    model_slug,
    new_job_id,
    rpc_subject,
)
from tests.conftest import text_job


def test_committed_json_schemas_are_current() -> None:
    for name, body in jsonschema.render().items():
        path = jsonschema.JSON_DIR / name
        assert path.exists(), f"{name} is missing: run python -m schemas.jsonschema"
        assert path.read_bytes() == body, f"{name} is stale: run python -m schemas.jsonschema"


@pytest.mark.parametrize(
    ("model", "slug"),
    [
        ("SmolLM2-135M-Instruct", "smollm2-135m-instruct"),
        ("org/model:Q4_K_M", "org-model-q4_k_m"),
        ("a.b*c>d e", "a-b-c-d-e"),
    ],
)
def test_model_slug_is_one_subject_token(model: str, slug: str) -> None:
    assert model_slug(model) == slug
    assert job_subject("llm", model) == f"jobs.llm.{slug}"
    assert consumer_name("sd", model) == f"sd-{slug}"
    assert rpc_subject(model, "tokenize") == f"rpc.llm.{slug}.tokenize"


def test_model_slug_rejects_nothing_left() -> None:
    with pytest.raises(ValueError, match="subject-safe"):
        model_slug("...")


def test_job_ids_are_unguessable_and_subject_safe() -> None:
    ids = {new_job_id() for _ in range(1000)}
    assert len(ids) == 1000
    for job_id in ids:
        assert len(job_id) == 32
        assert is_job_id(job_id)
        assert not set(".*> ") & set(job_id)
    assert dlq_subject("jobs.llm.x") == "dlq.jobs.llm.x"


def test_job_round_trips_and_invalid_jobs_are_poison() -> None:
    job = text_job(max_tokens=3, stop=["\n"])
    assert decode_job(encode(job)) == job
    with pytest.raises(Poison, match="not JSON"):
        decode_job(b"\xff")
    with pytest.raises(Poison, match="temperature"):
        decode_job(encode(job).replace(b'"temperature":1.0', b'"temperature":9.0'))


def test_unknown_fields_are_kept_for_forward_compatibility() -> None:
    data = encode(text_job()).replace(b'"stream":true', b'"stream":true,"future_field":1')
    assert decode_job(data).model_extra == {"future_field": 1}


def test_events_decode_to_their_classes() -> None:
    assert isinstance(decode_event(encode(Delta(text="hi", tokens=1))), Delta)
    done = decode_event(encode(Done(finish_reason="stop", usage=Usage(prompt_tokens=2))))
    assert isinstance(done, Done)
    assert done.usage.prompt_tokens == 2


def test_positions_order_attempts_before_sequence() -> None:
    assert Position(1, 9) < Position(2, 1)
    assert Position.parse(Position(3, 14).event_id()) == Position(3, 14)
    for bad in ("", "x-1", "0-0", "1"):
        with pytest.raises(ValueError):  # noqa: PT011 - int() and parse() word it differently
            Position.parse(bad)


def test_error_codes_rebuild_their_exception() -> None:
    e = error_from_code(ErrorCode.QUEUE_FULL, "full")
    assert isinstance(e, QueueFull)
    assert e.retryable
    assert error_from_code("no-such-code", "x").code == ErrorCode.INTERNAL
    detailed = error_from_code(ErrorCode.INVALID_REQUEST, "bad n", param="n", retryable=True)
    assert (detailed.param, detailed.retryable) == ("n", True)
