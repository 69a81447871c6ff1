"""How an embedding travels: little-endian float32 in base64, OpenAI's ``encoding_format:
base64``, so the edge hands a worker's vector to such a client as it came."""

from __future__ import annotations

import base64
import sys
from array import array
from collections.abc import Sequence


def encode_vector(vector: Sequence[float]) -> str:
    """``vector`` as base64 of little-endian float32."""
    packed = array("f", vector)
    if sys.byteorder != "little":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode()


def decode_vector(b64: str) -> list[float]:
    """The floats of ``encode_vector``'s output."""
    packed = array("f", base64.b64decode(b64))
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tolist()
