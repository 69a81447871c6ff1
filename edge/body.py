"""Reading and validating request bodies: every failure is a 400 that names the field."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from schemas.errors import InvalidRequest

M = TypeVar("M", bound=BaseModel)
_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "TextPart"}


async def read_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object; anything else raises InvalidRequest (400)."""
    raw = await request.read()  # bounded by client_max_size (413 past it)
    try:
        data = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError:
        raise InvalidRequest("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
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
