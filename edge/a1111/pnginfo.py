"""The text chunks of a PNG, read without an imaging library (the edge has none).

A1111's ``/sdapi/v1/png-info`` reads the ``parameters`` chunk that it (and headrace's
diffusion worker) writes into every image. Pillow writes it as ``tEXt`` (Latin-1), or as
``iTXt`` (UTF-8) when the text is not Latin-1; ``zTXt`` and compressed ``iTXt`` are read too.
"""

from __future__ import annotations

import struct
import zlib

from schemas.errors import InvalidRequest

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A text chunk may be compressed; more than this inflated is not a caption but a zip bomb.
MAX_TEXT_BYTES = 1 << 20


def text_chunks(png: bytes, param: str = "image") -> dict[str, str]:
    """Every text chunk of ``png`` by keyword (the first of a keyword wins, as Pillow keeps it)."""
    if not png.startswith(PNG_SIGNATURE):
        raise InvalidRequest("the image is not a PNG", param=param)
    out: dict[str, str] = {}
    at = len(PNG_SIGNATURE)
    while at + 12 <= len(png):
        length, kind = struct.unpack(">I4s", png[at : at + 8])
        data = png[at + 8 : at + 8 + length]
        at += 12 + length  # length, type, data, CRC
        if at > len(png):
            break
        if kind == b"IEND":
            return out
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            keyword, text = _text(kind, data, param)
            out.setdefault(keyword, text)
    raise InvalidRequest("the PNG is truncated (it has no IEND chunk)", param=param)


def _text(kind: bytes, data: bytes, param: str) -> tuple[str, str]:
    """One text chunk's keyword and text (PNG spec 11.3.4)."""
    keyword, sep, rest = data.partition(b"\0")
    if not sep:
        raise InvalidRequest("a PNG text chunk has no keyword", param=param)
    name = keyword.decode("latin-1")
    if kind == b"tEXt":
        return name, rest.decode("latin-1")
    if kind == b"zTXt":
        return name, _inflate(rest[1:], param).decode("latin-1")
    if len(rest) < 2:
        raise InvalidRequest("a PNG iTXt chunk is truncated", param=param)
    compressed, body = rest[0], rest[2:]
    _language, _, body = body.partition(b"\0")
    _translated, _, body = body.partition(b"\0")
    text = _inflate(body, param) if compressed else body
    try:
        return name, text.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("a PNG iTXt chunk is not UTF-8", param=param) from None


def _inflate(data: bytes, param: str) -> bytes:
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(data, MAX_TEXT_BYTES)
    except zlib.error:
        raise InvalidRequest("a compressed PNG text chunk is corrupt", param=param) from None
    if inflater.unconsumed_tail:
        raise InvalidRequest("a PNG text chunk is too large", param=param)
    return text
