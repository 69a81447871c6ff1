"""What one API key may do per minute, and at once."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-key limits; ``None`` is unlimited.

    ``image_budget`` counts megapixel-steps per minute: a 512x512 image at 30 steps
    costs 0.262144 x 30 = 7.9, rounded up to 8.
    """

    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    image_budget: int | None = None

    @property
    def any(self) -> bool:
        """True when at least one limit applies (else the key never touches Redis)."""
        return any(
            v is not None for v in (self.rpm, self.tpm, self.max_parallel, self.image_budget)
        )


def megapixel_steps(width: int, height: int, steps: int, images: int = 1) -> int:
    """The image budget an image job costs: megapixels x steps x images, rounded up."""
    return max(1, -(-width * height * steps * images // 1_000_000))
