"""Reading an image's declared size from its header, without decoding it."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from schemas.errors import InvalidRequest
from schemas.image_size import check_pixels, declared_size
from tests.conftest import huge_png


def encoded(size: tuple[int, int], fmt: str, mode: str = "RGB", **save: object) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, "teal").save(buffer, format=fmt, **save)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("fmt", "mode", "save"),
    [
        ("PNG", "RGB", {}),
        ("PNG", "1", {}),
        ("PNG", "RGBA", {}),
        ("JPEG", "RGB", {}),
        ("JPEG", "RGB", {"progressive": True}),
        ("JPEG", "L", {"exif": Image.Exif()}),
        ("JPEG", "RGB", {"icc_profile": b"x" * 3000, "quality": 20}),  # APP2 before the frame
        ("WEBP", "RGB", {}),  # lossy: VP8
        ("WEBP", "RGB", {"lossless": True}),  # VP8L
        ("WEBP", "RGBA", {"exif": b"Exif\x00\x00"}),  # extended: VP8X
    ],
)
@pytest.mark.parametrize("size", [(1, 1), (64, 96), (1000, 7)])
def test_the_declared_size_is_the_size_pil_decodes(
    fmt: str, mode: str, save: dict[str, object], size: tuple[int, int]
) -> None:
    data = encoded(size, fmt, mode, **save)
    with Image.open(io.BytesIO(data)) as image:
        assert declared_size(data) == image.size == size


def test_a_decompression_bomb_declares_its_size_in_a_few_kilobytes() -> None:
    bomb = huge_png()
    assert len(bomb) < 20_000
    assert declared_size(bomb) == (12_000, 12_000)
    with pytest.raises(InvalidRequest, match="12000 x 12000 pixels") as raised:
        check_pixels(bomb, 4096 * 4096, "init_images")
    assert raised.value.param == "init_images"
    assert check_pixels(huge_png(4096, 4096), 4096 * 4096, "init_images") == (4096, 4096)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x89PNG\r\n\x1a\n",  # the signature alone
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIEND",  # not IHDR first
        b"\xff\xd8\xff\xe0\x00\x10JFIF",  # cut before the frame header
        b"\xff\xd8\xff\xda\x00\x02",  # scan data before a frame header
        b"\xff\xd8\xff\xc0\x00\x11\x08\x00\x00\x00\x10",  # height 0: declared later (DNL)
        b"RIFF\x00\x00\x00\x00WEBPVP8 ",  # no frame
        b"GIF89a\x01\x00\x01\x00",
    ],
)
def test_a_header_that_says_no_size_is_refused(data: bytes) -> None:
    assert declared_size(data) is None
    with pytest.raises(InvalidRequest, match="does not say its size"):
        check_pixels(data, 100, "image")
