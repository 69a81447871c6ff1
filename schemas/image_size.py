"""The pixel size an input image declares in its header (PNG, JPEG, WebP), read without
decoding it, and the pixel budget the edge and the image workers hold it to.

A PNG of a few kilobytes may declare 12 000 x 12 000 pixels (one colour at one bit per pixel
compresses to almost nothing) and decode to hundreds of megabytes: the size is checked from
the header first, before anything decodes the image.
"""

from __future__ import annotations

from schemas.errors import InvalidRequest

# 16.8 megapixels: the largest side a job may ask for, squared. Decoded as RGB that is
# 50 MB; the worker's conversion and resize need about as much again.
DEFAULT_MAX_INPUT_PIXELS = 4096 * 4096

_PNG = b"\x89PNG\r\n\x1a\n"
# JPEG markers without a length field (TEM, RST0-7, SOI), and the SOFn markers that are not
# frame headers (DHT, JPG, DAC): ITU T.81 table B.1.
_STANDALONE = {0x01, *range(0xD0, 0xD9)}
_NOT_FRAMES = {0xC4, 0xC8, 0xCC}


def declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as the image's header declares them; None when it cannot be read."""
    if data.startswith(_PNG):
        return _png(data)
    if data.startswith(b"\xff\xd8"):
        return _jpeg(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp(data)
    return None


def check_pixels(data: bytes, max_pixels: int, param: str) -> tuple[int, int]:
    """The declared size, if within ``max_pixels``; else InvalidRequest naming ``param``."""
    size = declared_size(data)
    if size is None:
        raise InvalidRequest(
            "an image's header does not say its size: it is not a whole PNG, JPEG or WebP",
            param=param,
        )
    width, height = size
    if width * height > max_pixels:
        raise InvalidRequest(
            f"an image of {width} x {height} pixels is larger than the {max_pixels} pixels "
            "accepted",
            param=param,
        )
    return size


def _png(data: bytes) -> tuple[int, int] | None:
    # The first chunk is IHDR: length, type, then width and height, big-endian (PNG 11.2.2).
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _jpeg(data: bytes) -> tuple[int, int] | None:
    """Walk the segments after SOI to the frame header: precision, height, width (T.81 B.2.2)."""
    i, end = 2, len(data)
    while i + 4 <= end:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # a fill byte
            i += 1
        elif marker in _STANDALONE:
            i += 2
        elif marker in (0xD9, 0xDA):  # EOI, or scan data before any frame header
            return None
        elif 0xC0 <= marker <= 0xCF and marker not in _NOT_FRAMES:
            if i + 9 > end:
                return None
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            # A height of 0 is declared later (a DNL segment): not followed, so refused.
            return (width, height) if width and height else None
        else:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def _webp(data: bytes) -> tuple[int, int] | None:
    """The first chunk of the RIFF container: VP8X (extended), VP8L (lossless) or VP8 (lossy)."""
    chunk, payload = data[12:16], data[20:]
    if chunk == b"VP8X" and len(payload) >= 10:  # canvas size minus one, 24 bits each
        return int.from_bytes(payload[4:7], "little") + 1, int.from_bytes(
            payload[7:10], "little"
        ) + 1
    if chunk == b"VP8L" and len(payload) >= 5 and payload[0] == 0x2F:  # 14 bits each, minus one
        bits = int.from_bytes(payload[1:5], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(payload) >= 10 and payload[3:6] == b"\x9d\x01\x2a":  # key frame
        width = int.from_bytes(payload[6:8], "little") & 0x3FFF
        height = int.from_bytes(payload[8:10], "little") & 0x3FFF
        return width, height
    return None
