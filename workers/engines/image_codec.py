"""Image bytes in and out of the diffusion engine: init images decoded, results encoded as PNG."""

from __future__ import annotations

import base64
import io

from PIL import Image, PngImagePlugin

from schemas.errors import InvalidRequest
from schemas.image_size import DEFAULT_MAX_INPUT_PIXELS, check_pixels
from schemas.jobs import ImageInput

_INPUT_FORMATS = ("PNG", "JPEG", "WEBP")


def limit_pixels(max_pixels: int) -> None:
    """Hold PIL itself to the pixel budget too (process-wide), behind ``decode_init_image``'s
    own check: past twice ``Image.MAX_IMAGE_PIXELS`` PIL refuses to open an image at all."""
    Image.MAX_IMAGE_PIXELS = max_pixels


def decode_init_image(
    item: ImageInput, width: int, height: int, max_pixels: int = DEFAULT_MAX_INPUT_PIXELS
) -> Image.Image:
    """An init image as RGB at the job's size; ``InvalidRequest`` when it is no image we read
    or declares more than ``max_pixels`` pixels (checked before anything decodes it).

    The runtime resolves object references before the engine sees a job, so an item
    without inline ``b64`` here is a malformed job.
    """
    if not item.b64:
        raise InvalidRequest("init image has no inline base64 data", param="init_images")
    try:
        data = base64.b64decode(item.b64, validate=True)
    except ValueError as e:  # binascii.Error
        raise InvalidRequest("init image is not base64", param="init_images") from e
    # NATS-native producers skip the edge's check: a few kilobytes may declare gigapixels.
    check_pixels(data, max_pixels, "init_images")
    try:
        with Image.open(io.BytesIO(data), formats=_INPUT_FORMATS) as image:
            image.load()  # decode now: a truncated file fails here, not later in the pipeline
            return image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    # UnidentifiedImageError and truncated files are OSErrors; PIL's own bomb check (the
    # backstop, should its reading of the header differ from ours) a DecompressionBombError.
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidRequest(
            f"init image is not a base64 PNG, JPEG or WebP image ({type(e).__name__})",
            param="init_images",
        ) from e


def png_bytes(image: Image.Image, *, parameters: str | None = None) -> bytes:
    """The image as PNG, with A1111's ``parameters`` text chunk when given."""
    info = None
    if parameters is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def png_base64(image: Image.Image, *, parameters: str | None = None) -> str:
    """``png_bytes`` as base64 text, as events carry images."""
    return base64.b64encode(png_bytes(image, parameters=parameters)).decode("ascii")
