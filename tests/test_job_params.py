"""Job parameters refuse unknown fields."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from schemas.codec import decode_job, encode
from schemas.errors import Poison
from schemas.jobs import ChatMessage, ImageInput, ImageParams, TextParams
from tests.conftest import text_job
from workers.engines.llama_rpc import apply_template


def test_a_misspelt_text_parameter_is_an_error_not_a_default() -> None:
    with pytest.raises(ValidationError, match="max_token"):
        TextParams(seed=1, max_token=3)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("model", "fields"),
    [
        (TextParams, {"seed": 1, "temprature": 0.5}),
        (ImageParams, {"prompt": "a cat", "seed": 1, "step": 5}),
        (ChatMessage, {"role": "user", "content": "hi", "tool_call_id": "x"}),
        (ImageInput, {"b64": "x", "url": "http://x"}),
    ],
)
def test_job_parameter_models_forbid_unknown_fields(model: Any, fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        model.model_validate(fields)


def test_a_job_whose_params_carry_an_unknown_field_is_poison() -> None:
    data = encode(text_job()).replace(b'"params":{', b'"params":{"max_token":3,')
    with pytest.raises(Poison, match="max_token"):
        decode_job(data)


def test_apply_template_still_ignores_unknown_message_fields() -> None:
    class Template:
        def render(self, messages: list[ChatMessage]) -> str:
            return "|".join(f"{m.role}:{m.content}" for m in messages)

    payload = {"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]}
    assert apply_template(Template(), payload) == {"prompt": "tool:42"}  # type: ignore[arg-type]


def test_the_envelope_stays_forward_compatible() -> None:
    data = encode(text_job()).replace(b'"stream":true', b'"stream":true,"future_field":1')
    assert decode_job(data).model_extra == {"future_field": 1}
