"""AUTOMATIC1111's "parameters" text: how an image says what made it.

A1111 writes it into every PNG (a text chunk named ``parameters``) and returns
it in its API's ``info``; tools that read one read the other. Pure Python: the
edge builds ``info`` with it and the diffusion engine writes the PNG chunk.
"""

from __future__ import annotations

import json

from schemas.jobs import ImageParams
from schemas.samplers import canonical_sampler


def infotext(params: ImageParams, seed: int, model: str) -> str:
    """The prompt, the negative prompt's line when there is one, then the settings line.

    ``seed`` is the image's own seed (image ``i`` of a job has ``params.seed + i``).
    """
    settings = {
        "Steps": str(params.steps),
        "Sampler": canonical_sampler(params.sampler) or params.sampler,
        "CFG scale": str(params.cfg_scale),
        "Seed": str(seed),
        "Size": f"{params.width}x{params.height}",
        "Model": model,
    }
    if params.init_images:
        settings["Denoising strength"] = str(params.denoising_strength)
    lines = [params.prompt]
    if params.negative_prompt:
        lines.append(f"Negative prompt: {params.negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in settings.items()))
    return "\n".join(lines)


def _quote(value: str) -> str:
    """A value as A1111 writes it: JSON-quoted when it holds a separator (, : or a newline)."""
    if any(c in value for c in ",:\n"):
        return json.dumps(value, ensure_ascii=False)
    return value
