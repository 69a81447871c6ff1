"""A1111 sampler names to diffusers schedulers, built from the model's own scheduler config.

The model's config carries its noise schedule (betas, prediction type, timestep
spacing); the sampler name picks the solver and, for the Karras names, the
Karras sigma spacing. Table after diffusers' "A1111 / k-diffusion" mapping in
its scheduler docs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from schemas.errors import InvalidRequest
from schemas.samplers import SAMPLERS, canonical_sampler

_KARRAS = {"use_karras_sigmas": True}
# The SDE variant of DPM-Solver++ draws its noise with the pipeline's generators
# (diffusers' randn_tensor), so it needs no torchsde, unlike DPMSolverSDEScheduler.
_SDE = {"algorithm_type": "sde-dpmsolver++"}

# name -> (scheduler class, overrides of the model's config). The classes are typed Any:
# mypy reads diffusers' root names as its stand-ins for missing backends, and the real
# modules cannot all be imported directly (LMS's imports scipy).
_TABLE: dict[str, tuple[Any, Mapping[str, Any]]] = {
    "Euler": (EulerDiscreteScheduler, {}),
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    "LMS": (LMSDiscreteScheduler, {}),
    "LMS Karras": (LMSDiscreteScheduler, _KARRAS),
    "Heun": (HeunDiscreteScheduler, {}),
    "DPM2": (KDPM2DiscreteScheduler, {}),
    "DPM2 a": (KDPM2AncestralDiscreteScheduler, {}),
    "DPM++ 2M": (DPMSolverMultistepScheduler, {}),
    "DPM++ 2M Karras": (DPMSolverMultistepScheduler, _KARRAS),
    "DPM++ 2M SDE": (DPMSolverMultistepScheduler, _SDE),
    "DPM++ 2M SDE Karras": (DPMSolverMultistepScheduler, {**_SDE, **_KARRAS}),
    # Stable Diffusion's own DDIM settings, whatever scheduler the checkpoint ships.
    "DDIM": (DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": False}),
    # PLMS is PNDM without its Runge-Kutta warm-up steps.
    "PLMS": (PNDMScheduler, {"skip_prk_steps": True, "set_alpha_to_one": False}),
    "UniPC": (UniPCMultistepScheduler, {}),
    "DEIS": (DEISMultistepScheduler, {}),
}
assert _TABLE.keys() == SAMPLERS.keys(), "every sampler in the contract needs a scheduler"


def make_scheduler(name: str, config: Mapping[str, Any]) -> SchedulerMixin:
    """A new scheduler for the sampler ``name`` (or an alias) from a model's scheduler config.

    Raises ``InvalidRequest`` (param ``sampler_name``) for a name the table does not know,
    and for one whose scheduler needs a package this install lacks (LMS needs scipy).
    """
    canonical = canonical_sampler(name)
    if canonical is None:
        raise InvalidRequest(
            f"unknown sampler {name[:64]!r}; known samplers: {', '.join(SAMPLERS)}",
            param="sampler_name",
        )
    cls, overrides = _TABLE[canonical]
    try:
        scheduler: SchedulerMixin = cls.from_config(config, **overrides)
    except ImportError as e:  # diffusers' stand-in class for a missing backend (LMS needs scipy)
        raise InvalidRequest(
            f"sampler {canonical!r} is not installed on this worker ({cls.__name__} needs a "
            "package it lacks)",
            param="sampler_name",
        ) from e
    return scheduler
