"""Reading and validating request bodies: every failure is a 400 that names the field."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from schemas.errors import InvalidRequest
from schemas.jobs import json_depth

M = TypeVar("M", bound=BaseModel)
# Levels of objects and arrays a body may nest (the body itself is 1). What a body holds
# travels on in jobs, option records and echoed answers, and orjson writes at most 254
# levels: past that bound a value would fail later, as a 500, instead of now as a 400.
MAX_BODY_DEPTH = 128
_TOO_DEEP = f"the request body may nest at most {MAX_BODY_DEPTH} levels of objects and arrays"
_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "TextPart"}


async def read_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object; anything else raises InvalidRequest (400)."""
    raw = await request.read()  # bounded by client_max_size (413 past it)
    try:
        data = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError as e:
        if "depth limit" in str(e):  # orjson reads at most 1024 levels
            raise InvalidRequest(_TOO_DEEP) from None
        raise InvalidRequest("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    for key, value in data.items():
        if json_depth(value, MAX_BODY_DEPTH - 1) >= MAX_BODY_DEPTH:
            raise InvalidRequest(f"{_TOO_DEEP}; '{key}' nests deeper", param=key)
    return data


async def parse(request: web.Request, model: type[M]) -> M:
    """The body as ``model``; invalid JSON or values raise InvalidRequest (400)."""
    data = await read_object(request)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise invalid(e) from None


def invalid(e: ValidationError) -> InvalidRequest:
    """The first validation problem, phrased for a client, with ``param`` naming the field."""
    err = e.errors(include_url=False, include_input=False, include_context=False)[0]
    loc = []
    for part in map(str, err["loc"]):
        if part in _TYPE_NAMES or "[" in part or part.startswith(("function-", "tagged-union")):
            break  # pydantic names union members by type: the field path ends here
        loc.append(part)
    param = ".".join(loc) or None
    message = err["msg"].removeprefix("Value error, ")
    if param:
        message = f"Invalid value for '{param}': {message}"
    return InvalidRequest(message, param=param)
