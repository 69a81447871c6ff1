"""AUTOMATIC1111's "parameters" text: how an image says what made it.

A1111 writes it into every PNG (a text chunk named ``parameters``) and returns
it in its API's ``info``; tools that read one read the other. Pure Python: the
edge builds ``info`` with it and the diffusion engine writes the PNG chunk.
"""

from __future__ import annotations

import json
import re

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


# One "Key: value," of the settings line; a value is JSON-quoted or runs to the next comma
# (A1111's modules/infotext_utils.py, re_param).
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_infotext(text: str) -> dict[str, str]:
    """A "parameters" text read back as A1111's ``parse_generation_parameters`` reads it:
    ``Prompt``, ``Negative prompt``, then each setting as a string, ``Size`` split into
    ``Size-1`` and ``Size-2``. A last line with fewer than three settings is prompt text."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for raw in lines:
        line = raw.strip()
        if line.startswith("Negative prompt:"):
            negative.append(line.removeprefix("Negative prompt:").strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        value = _unquote(value)
        if (size := _SIZE.match(value)) is not None:
            out[f"{key}-1"], out[f"{key}-2"] = size.group(1), size.group(2)
        else:
            out[key] = value
    return out


def _unquote(value: str) -> str:
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        unquoted = json.loads(value)
    except ValueError:
        return value
    return unquoted if isinstance(unquoted, str) else value


def _quote(value: str) -> str:
    """A value as A1111 writes it: JSON-quoted when it holds a separator (, : or a newline)."""
    if any(c in value for c in ",:\n"):
        return json.dumps(value, ensure_ascii=False)
    return value
