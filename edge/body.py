"""Reading and validating request bodies: every failure is a 400 that names the field."""

from __future__ import annotations

import types
import typing
from typing import Any, TypeVar

import orjson
from aiohttp import hdrs, web
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from schemas.errors import InvalidRequest
from schemas.jobs import json_depth


class Lenient(BaseModel):
    """Base of every API's request models: unknown fields are ignored, as OpenAI-compatible,
    llama.cpp and Ollama servers do (keep_alive, think ...).

    Known booleans are ``StrictBool`` in every request model: pydantic's lax mode would read
    ``"yes"``, ``"on"`` or ``1`` as true, which no client means. The other way round holds
    too: ``true`` is refused where a number is expected (lax mode reads it as 1).
    """

    model_config = ConfigDict(extra="ignore")

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and _bool_for_number(field.annotation, value):
            raise ValueError("Input should not be a boolean")
        return value


def _bool_for_number(tp: Any, value: Any) -> bool:
    """``value`` is a boolean, or a list holding one, where ``tp`` admits none."""
    if isinstance(value, bool):
        return not _admits_bool(tp)
    if isinstance(value, list) and any(isinstance(v, bool) for v in value):
        items = _list_items(tp)
        return bool(items) and not any(_admits_bool(i) for i in items)
    return False


def _list_items(tp: Any) -> list[Any]:
    """The item types of the list types in ``tp`` (a list, or a union or alias with lists)."""
    if hasattr(tp, "__value__"):
        return _list_items(tp.__value__)
    origin = typing.get_origin(tp)
    if origin is list:
        return list(typing.get_args(tp)[:1])
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        args = typing.get_args(tp)
        return [
            i for a in (args[:1] if origin is typing.Annotated else args) for i in _list_items(a)
        ]
    return []


def _admits_bool(tp: Any) -> bool:
    """Whether a field of type ``tp`` may hold ``true``/``false`` (bool, Any, or a union or
    literal with one); numbers, strings, lists and models may not."""
    if tp is bool or tp is Any or tp is object:
        return True
    if hasattr(tp, "__value__"):  # a ``type X = ...`` alias
        return _admits_bool(tp.__value__)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return any(isinstance(a, bool) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        args = typing.get_args(tp)
        return any(_admits_bool(a) for a in (args[:1] if origin is typing.Annotated else args))
    return False


M = TypeVar("M", bound=BaseModel)
# Levels of objects and arrays a body may nest (the body itself is 1). What a body holds
# travels on in jobs, option records and echoed answers, and orjson writes at most 254
# levels: past that bound a value would fail later, as a 500, instead of now as a 400.
MAX_BODY_DEPTH = 128
_TOO_DEEP = f"the request body may nest at most {MAX_BODY_DEPTH} levels of objects and arrays"
_JSON_TYPES = {"application/json", "application/x-www-form-urlencoded"}
_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "TextPart"}


def check_json_type(request: web.Request) -> None:
    """A body must be declared JSON (``application/json`` or ``application/*+json``); 415 if not.

    Two other cases are read as JSON too, so that no real client breaks: no Content-Type at
    all (Python's requests with ``data=``, httpx with ``content=``; FastAPI, and so A1111,
    reads those as JSON) and ``application/x-www-form-urlencoded``, what ``curl -d`` and
    Python's urllib send unless told otherwise, as in Ollama's examples and our own (Ollama
    and llama.cpp's server ignore the header). LLMUnity sends ``application/json`` (LLMCaller's request headers), as do the
    OpenAI SDKs. Everything else (``text/plain``, multipart forms, XML) is refused: a body we
    would read as something its sender did not mean.
    """
    if hdrs.CONTENT_TYPE not in request.headers:
        return
    ctype = request.content_type  # lower-case, parameters (charset) removed
    if ctype in _JSON_TYPES or (ctype.startswith("application/") and ctype.endswith("+json")):
        return
    raise web.HTTPUnsupportedMediaType(
        text=f"the request body must be JSON (Content-Type: application/json), not {ctype}"
    )


async def read_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object; anything else raises InvalidRequest (400), or 415 when it
    is declared as something other than JSON."""
    if request.body_exists:  # an empty POST declares nothing worth refusing
        check_json_type(request)
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
