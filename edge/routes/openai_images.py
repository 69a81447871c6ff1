"""OpenAI image generation on the same image workers as the A1111 API."""

from __future__ import annotations

import time

from aiohttp import web

from edge.body import parse
from edge.context import ctx
from edge.errors import OPENAI
from edge.imaging import answer, check_image_bounds, pick_model
from edge.jobs import seeds
from edge.openai.image_generation import ImageGenerationRequest, generation_response
from edge.routing import Routes
from edge.session import Session
from schemas.errors import InvalidRequest

routes = Routes(OPENAI)


@routes.generation("/v1/images/generations")
async def generations(request: web.Request, session: Session) -> web.StreamResponse:
    """``n`` images of ``size`` as b64_json (one job, batch_size n)."""
    req = await parse(request, ImageGenerationRequest)
    if req.response_format == "url":
        raise InvalidRequest(
            "response_format 'url' is not supported: headrace does not host images; use 'b64_json'",
            param="response_format",
        )
    width, height = req.dimensions()
    steps = req.steps or ctx(request).settings.openai_image_steps
    check_image_bounds(
        request, width=width, height=height, steps=steps, count=req.n, count_param="n"
    )
    params = req.job_params(seeds(req.seed, 1)[0], steps)
    model = pick_model(request, req.model)
    job = await session.submit_image(model, params, [], None)
    created = int(time.time())
    return await answer(session, job, lambda result: generation_response(created, result))
