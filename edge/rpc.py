"""Request/reply to the workers of a text model: tokenize, detokenize, apply-template, props."""

from __future__ import annotations

from typing import Any

import nats.errors
import orjson
from aiohttp import web

from edge.context import caller, ctx
from schemas.errors import InvalidRequest, NoWorker, Unavailable, error_from_code
from schemas.subjects import rpc_subject


async def default_model(request: web.Request, asked: str | None) -> str:
    """The model a request means: the one it names, HEADRACE_DEFAULT_MODEL, or the only live one.

    llama.cpp's server has one model, so its clients (LLMUnity) name none.
    """
    c = ctx(request)
    key = caller(request)
    asked = asked or c.settings.default_model
    if asked:
        key.check(asked)
        await c.fleet.require("llm", asked, c.settings.no_worker_wait_s)
        return asked
    live = sorted(m for m in c.fleet.models("llm") if key.allows(m))
    if len(live) == 1:
        return live[0]
    if not live:
        raise NoWorker("no text model has a live worker right now; retry shortly")
    raise InvalidRequest(
        f"several models are served ({', '.join(live)}): name one in 'model' "
        "(or set HEADRACE_DEFAULT_MODEL)",
        param="model",
    )


async def served_model(request: web.Request, asked: str | None) -> str:
    """The model a llama.cpp-style request gets: the one it names when that one is live (and
    allowed), else the default (``default_model``) whatever it names.

    llama.cpp's server answers with the one model it has, whatever ``model`` says, and its
    clients and test suite send names like ``gpt-3.5-turbo``; a deployment serving several
    models still lets them pick one by name.
    """
    live = ctx(request).fleet.models("llm")
    if asked and asked in live and caller(request).allows(asked):
        return asked
    return await default_model(request, None)


async def call(
    request: web.Request, model: str, op: str, payload: dict[str, Any]
) -> dict[str, Any]:
    """Ask any worker of ``model`` (a queue group answers once); errors come back as ours."""
    nc = ctx(request).nc
    if nc is None:
        raise Unavailable("the edge is not connected to NATS")
    try:
        reply = await nc.request(rpc_subject(model, op), orjson.dumps(payload), timeout=10)
    except nats.errors.NoRespondersError as e:
        raise NoWorker(f"no worker of '{model}' answered") from e
    except nats.errors.TimeoutError as e:
        raise Unavailable(f"the workers of '{model}' did not answer {op} in time") from e
    body = orjson.loads(reply.data)
    if "error" in body:
        error = body["error"]
        raise error_from_code(
            error.get("code", ""), error.get("message", ""), param=error.get("param")
        )
    result: dict[str, Any] = body["result"]
    return result
