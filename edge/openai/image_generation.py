"""OpenAI's ``POST /v1/images/generations``: the request and the response."""

from __future__ import annotations

import base64
from typing import Any, Literal

from pydantic import Field, field_validator

from edge.body import Lenient
from edge.imaging import ImageResult
from schemas.jobs import MAX_PROMPT_CHARS, ImageParams


class ImageGenerationRequest(Lenient):
    """Text to image. ``quality``, ``style`` and ``background`` are ignored; ``url`` responses
    are refused (headrace hosts no files). ``steps`` is headrace's own addition."""

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(default=None, max_length=256)
    n: int = Field(default=1, ge=1, le=16)
    size: str = "512x512"
    response_format: Literal["b64_json", "url"] = "b64_json"
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    steps: int | None = Field(default=None, ge=1, le=150)
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)

    @field_validator("size")
    @classmethod
    def _size(cls, v: str) -> str:
        if v == "auto":
            return "512x512"
        w, sep, h = v.partition("x")
        if not (sep and w.isdigit() and h.isdigit()):
            raise ValueError("size must look like 512x512")
        if int(w) % 8 or int(h) % 8:
            raise ValueError("width and height must be multiples of 8")
        return v

    def dimensions(self) -> tuple[int, int]:
        """(width, height)."""
        w, _, h = self.size.partition("x")
        return int(w), int(h)

    def job_params(self, seed: int, steps: int) -> ImageParams:
        """One job for all ``n`` images (a batch), generated from ``seed`` in ``steps`` steps
        (the request's own, or the deployment's default)."""
        width, height = self.dimensions()
        return ImageParams(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            steps=steps,
            width=width,
            height=height,
            seed=seed,
            batch_size=self.n,
        )


def generation_response(created: int, result: ImageResult) -> dict[str, Any]:
    """``{created, data: [{b64_json}]}``."""
    return {
        "created": created,
        "data": [{"b64_json": base64.b64encode(png).decode()} for png in result.images],
    }
