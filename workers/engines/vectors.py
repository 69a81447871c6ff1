"""Normalizing an embedding, as llama.cpp's server does (``common_embd_normalize``)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def normalize(vector: Sequence[float], norm: int) -> list[float]:
    """``vector`` scaled as ``common_embd_normalize(..., embd_norm=norm)``: -1 unchanged, 0 to
    the int16 range by its largest magnitude, 2 to unit Euclidean length, else the p-norm."""
    if norm == -1:
        return list(vector)
    if norm == 0:
        total = max((abs(x) for x in vector), default=0.0) / 32760.0
    elif norm == 2:
        total = math.sqrt(math.fsum(x * x for x in vector))
    else:  # 1 is taxicab
        total = math.fsum(abs(x) ** norm for x in vector) ** (1.0 / norm)
    scale = 1.0 / total if total > 0.0 else 0.0
    return [x * scale for x in vector]
