"""OpenAI's rate-limit headers: ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``."""

from __future__ import annotations

from edge.ratelimit.limits import Limits


def duration(ms: int) -> str:
    """A duration as OpenAI writes it (Go's style): ``250ms``, ``1.5s``, ``1m0s``."""
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest_ms = divmod(ms, 60_000)
    seconds = f"{rest_ms / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def rate_headers(
    limits: Limits, requests: tuple[int, int], tokens: tuple[int, int]
) -> dict[str, str]:
    """Headers for the limits a key has, given (used, ms until the oldest charge leaves) of each.

    ``reset`` is when the remainder next grows: when a refused request may fit again.
    """
    headers: dict[str, str] = {}
    for name, limit, (used, reset_ms) in (
        ("requests", limits.rpm, requests),
        ("tokens", limits.tpm, tokens),
    ):
        if limit is not None:
            headers[f"x-ratelimit-limit-{name}"] = str(limit)
            headers[f"x-ratelimit-remaining-{name}"] = str(max(0, limit - used))
            headers[f"x-ratelimit-reset-{name}"] = duration(reset_ms)
    return headers
