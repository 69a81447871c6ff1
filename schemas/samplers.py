"""The sampler names image jobs may use: AUTOMATIC1111's names, with its aliases.

Producers validate against this table (the edge answers 400 with the list); the
diffusion engine maps each name to a diffusers scheduler. Names are matched
without regard to case.
"""

from __future__ import annotations

# name -> aliases (A1111's ``k_*`` aliases and the short forms its API accepts)
SAMPLERS: dict[str, tuple[str, ...]] = {
    "Euler": ("k_euler",),
    "Euler a": ("k_euler_a", "k_euler_ancestral"),
    "LMS": ("k_lms",),
    "LMS Karras": ("k_lms_ka",),
    "Heun": ("k_heun",),
    "DPM2": ("k_dpm_2",),
    "DPM2 a": ("k_dpm_2_a",),
    "DPM++ 2M": ("k_dpmpp_2m",),
    "DPM++ 2M Karras": ("k_dpmpp_2m_ka",),
    "DPM++ 2M SDE": ("k_dpmpp_2m_sde",),
    "DPM++ 2M SDE Karras": ("k_dpmpp_2m_sde_ka",),
    "DDIM": ("ddim",),
    "PLMS": ("plms",),
    "UniPC": ("unipc",),
    "DEIS": ("deis",),
}

# A1111 1.9+ names the noise schedule separately; "Automatic" keeps the sampler's own.
SCHEDULES: tuple[str, ...] = ("Automatic", "Karras")

_BY_ALIAS = {
    alias.lower(): name for name, aliases in SAMPLERS.items() for alias in (name, *aliases)
}


def canonical_sampler(name: str) -> str | None:
    """The table name for ``name`` or one of its aliases, or None when it is unknown."""
    return _BY_ALIAS.get(name.strip().lower())


def canonical_schedule(name: str) -> str | None:
    """The schedule name for ``name`` (case-insensitive), or None when it is unknown."""
    wanted = name.strip().lower()
    return next((s for s in SCHEDULES if s.lower() == wanted), None)


def with_schedule(sampler: str, schedule: str) -> str:
    """Fold a separate schedule into the sampler name: ("DPM++ 2M", "Karras") -> "DPM++ 2M Karras".

    Raises ValueError when the pair names no known sampler.
    """
    name = canonical_sampler(sampler)
    kind = canonical_schedule(schedule)
    if name is None:
        raise ValueError(f"unknown sampler {sampler!r}")
    if kind is None:
        raise ValueError(f"unknown scheduler {schedule!r}")
    if kind == "Automatic" or name.endswith(" Karras"):
        return name
    combined = f"{name} Karras"
    if combined not in SAMPLERS:
        raise ValueError(f"sampler {name!r} has no Karras schedule")
    return combined
