"""Image bytes too large for one message travel through the ``images`` object store.

A job's input images and its results may each be inline (base64 in the message)
or an object named after the job. Producers call ``inputs_for`` before publishing,
workers ``resolve`` before running and ``offload`` before publishing ``done``;
consumers call ``fetch`` for every result. The bucket's TTL (``nats/buckets/images.json``)
removes objects nobody fetched.
"""

from __future__ import annotations

import base64
import binascii

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.object_store import ObjectStore

from schemas.errors import InvalidRequest, Unavailable
from schemas.events import Done, ImageRef
from schemas.jobs import ImageInput, ImageJob
from schemas.subjects import IMAGES_BUCKET

# Base64 characters a message may carry inline, all images together: well under nats-server's
# default 1 MB max_payload once the rest of the event is added.
DEFAULT_INLINE_CHARS = 512 * 1024


def input_name(job_id: str, index: int) -> str:
    """The object holding a job's ``index``-th input image."""
    return f"{job_id}/input-{index}"


def result_name(job_id: str, attempt: int, index: int) -> str:
    """The object holding a job's ``index``-th result (per attempt: a redelivery never clashes)."""
    return f"{job_id}/result-{attempt}-{index}.png"


class ImageStore:
    """Puts and gets image bytes in the ``images`` object store."""

    def __init__(self, js: JetStreamContext, inline_chars: int = DEFAULT_INLINE_CHARS) -> None:
        self.js = js
        self.inline_chars = inline_chars
        self._store: ObjectStore | None = None

    async def _bucket(self) -> ObjectStore:
        if self._store is None:
            try:
                self._store = await self.js.object_store(IMAGES_BUCKET)
            except (nats.js.errors.Error, nats.errors.Error) as e:
                raise Unavailable("the images object store is not reachable") from e
        return self._store

    async def put(self, name: str, data: bytes) -> None:
        """Store ``data`` under ``name``."""
        bucket = await self._bucket()
        try:
            await bucket.put(name, data)
        except (nats.js.errors.Error, nats.errors.Error) as e:
            raise Unavailable("an image could not be stored") from e

    async def get(self, name: str) -> bytes:
        """The bytes of object ``name``; InvalidRequest when it does not exist (or expired)."""
        bucket = await self._bucket()
        try:
            result = await bucket.get(name)
        except nats.js.errors.ObjectNotFoundError as e:
            raise InvalidRequest(f"image object {name!r} does not exist or has expired") from e
        except (nats.js.errors.Error, nats.errors.Error) as e:
            raise Unavailable("an image could not be fetched") from e
        return result.data or b""

    async def inputs_for(self, job_id: str, images: list[bytes]) -> list[ImageInput]:
        """Input images for a job: inline when they fit a message together, else objects."""
        encoded = [base64.b64encode(data).decode() for data in images]
        if sum(len(b) for b in encoded) <= self.inline_chars:
            return [ImageInput(b64=b) for b in encoded]
        out = []
        for i, data in enumerate(images):
            await self.put(input_name(job_id, i), data)
            out.append(ImageInput(object=input_name(job_id, i)))
        return out

    async def resolve(self, job: ImageJob) -> ImageJob:
        """The job with every object input fetched inline, as engines expect."""
        inputs = job.params.init_images
        if all(i.object is None for i in inputs):
            return job
        resolved = [
            ImageInput(b64=base64.b64encode(await self.get(i.object)).decode())
            if i.object is not None
            else i
            for i in inputs
        ]
        params = job.params.model_copy(update={"init_images": resolved})
        return job.model_copy(update={"params": params})

    async def offload(self, done: Done, job_id: str, attempt: int) -> Done:
        """``done`` with its images moved to objects when together they exceed the inline limit."""
        if sum(len(r.b64_png or "") for r in done.images) <= self.inline_chars:
            return done
        refs = []
        for i, ref in enumerate(done.images):
            if ref.b64_png is None:
                refs.append(ref)
                continue
            name = result_name(job_id, attempt, i)
            await self.put(name, base64.b64decode(ref.b64_png))
            refs.append(ref.model_copy(update={"b64_png": None, "object": name}))
        return done.model_copy(update={"images": refs})

    async def fetch(self, ref: ImageRef) -> bytes:
        """The PNG bytes of a result, inline or stored."""
        if ref.b64_png is not None:
            try:
                return base64.b64decode(ref.b64_png, validate=True)
            except (binascii.Error, ValueError) as e:
                raise InvalidRequest("an inline image is not valid base64") from e
        if ref.object is None:
            raise InvalidRequest("an image result names neither bytes nor an object")
        return await self.get(ref.object)
