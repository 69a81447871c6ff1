"""``headrace provision``: create or update streams, buckets and consumers, idempotently."""

from __future__ import annotations

from headrace.settings import ProvisionSettings
from schemas.connection import connect
from schemas.subjects import JobKind
from schemas.topology import Change, Limits, provision


def parse_models(specs: list[str]) -> list[tuple[JobKind, str]]:
    """``llm=SmolLM2`` / ``sd=tiny-sd`` → (kind, model) pairs."""
    out: list[tuple[JobKind, str]] = []
    for spec in specs:
        kind, sep, model = spec.partition("=")
        if not sep or kind not in ("llm", "sd") or not model:
            raise ValueError(f"--model takes KIND=MODEL with KIND llm or sd, not {spec!r}")
        out.append((kind, model))  # type: ignore[arg-type]
    return out


async def run(
    settings: ProvisionSettings,
    models: list[tuple[JobKind, str]],
    *,
    region: str | None = None,
    home: str | None = None,
) -> dict[str, Change]:
    """Connect, provision, disconnect; returns what changed.

    In a super-cluster (``HEADRACE_REGIONS``): every region's streams, registry and the
    models' consumers, each placed in its region, and the shared buckets in the first; or
    only ``region``'s when given. A region no cluster answers to raises ``UnknownRegion``.
    """
    nc = await connect(settings, "headrace-provision", connect_timeout_s=5)
    try:
        limits = Limits.model_validate(settings.model_dump(include=set(Limits.model_fields)))
        js = nc.jetstream()
        if region is not None:
            return await provision(js, limits, models, region=region, home=home)
        names = settings.region_names()
        if not names:
            return await provision(js, limits, models)
        out: dict[str, Change] = {}
        for r in names:
            out |= await provision(js, limits, models, region=r, home=names[0])
        return out
    finally:
        await nc.close()
