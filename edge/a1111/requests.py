"""A1111 txt2img and img2img bodies with A1111's defaults; out-of-range values are 400s."""

from __future__ import annotations

from typing import Any

from pydantic import Field, StrictBool, field_validator

from edge.body import Lenient
from schemas.errors import InvalidRequest
from schemas.jobs import MAX_INIT_IMAGES, MAX_PROMPT_CHARS, SEED_MAX, ImageParams
from schemas.samplers import SAMPLERS, canonical_sampler, with_schedule

MAX_TASK_ID_CHARS = 128  # a client-chosen task id (force_task_id, id_task)


class Txt2ImgRequest(Lenient):
    """``POST /sdapi/v1/txt2img``. Fields headrace does not implement are ignored, except those
    that would silently change the result (see ``refuse_unsupported``)."""

    prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    steps: int = Field(default=50, ge=1, le=150)
    cfg_scale: float = Field(default=7.0, ge=0.0, le=30.0)
    width: int = Field(default=512, ge=8, le=4096)
    height: int = Field(default=512, ge=8, le=4096)
    seed: int = Field(default=-1, ge=-1, le=SEED_MAX)
    sampler_name: str | None = Field(default=None, max_length=64)
    sampler_index: str | None = Field(default=None, max_length=64)  # the older name of the field
    scheduler: str | None = Field(default=None, max_length=64)
    batch_size: int = Field(default=1, ge=1, le=16)
    n_iter: int = Field(default=1, ge=1, le=16)
    override_settings: dict[str, Any] = Field(default_factory=dict)
    force_task_id: str | None = Field(default=None, max_length=MAX_TASK_ID_CHARS)
    enable_hr: StrictBool = False
    # A1111 takes it on txt2img too (its hires-fix strength, default 0.75) and reports it in
    # ``info``; the worker uses it only with an init image.
    denoising_strength: float = Field(default=0.75, ge=0.0, le=1.0)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError("must be a multiple of 8")
        return v

    def sampler(self) -> str:
        """The sampler's table name, with a separate ``scheduler`` folded in."""
        asked = self.sampler_name or self.sampler_index or "Euler"
        if canonical_sampler(asked) is None:
            known = ", ".join(SAMPLERS)
            raise InvalidRequest(
                f"unknown sampler {asked!r}; known samplers: {known}", param="sampler_name"
            )
        try:
            return with_schedule(asked, self.scheduler or "Automatic")
        except ValueError as e:
            raise InvalidRequest(
                f"{e}; known schedulers: Automatic, Karras", param="scheduler"
            ) from None

    def refuse_unsupported(self) -> None:
        """Refuse what headrace does not do rather than answer with something else."""
        if self.enable_hr:
            raise InvalidRequest("hires fix (enable_hr) is not supported", param="enable_hr")

    def asked_seed(self) -> int | None:
        """The seed asked for, or None for a random one (A1111's -1)."""
        return None if self.seed == -1 else self.seed

    def job_params(self, seed: int, preview_every: int) -> ImageParams:
        """The job parameters, generated from ``seed``, with a preview every ``preview_every``
        steps (0: none); the init images travel beside them (``edge.imaging``)."""
        return ImageParams(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            steps=self.steps,
            cfg_scale=self.cfg_scale,
            width=self.width,
            height=self.height,
            seed=seed,
            sampler=self.sampler(),
            batch_size=self.batch_size,
            n_iter=self.n_iter,
            denoising_strength=self.denoising_strength,
            preview_every=preview_every,
        )


class Img2ImgRequest(Txt2ImgRequest):
    """``POST /sdapi/v1/img2img``: init images as base64 or data URIs (the first one is used)."""

    init_images: list[str] = Field(min_length=1, max_length=MAX_INIT_IMAGES)
    mask: str | None = None

    def refuse_unsupported(self) -> None:
        """Inpainting (``mask``) is not supported either."""
        super().refuse_unsupported()
        if self.mask:
            raise InvalidRequest("inpainting (mask) is not supported", param="mask")


class PngInfoRequest(Lenient):
    """``POST /sdapi/v1/png-info``: one image, base64 or a data URI."""

    image: str = Field(min_length=1)
