"""AUTOMATIC1111's ``/sdapi/v1/options``, kept per API key in the ``options`` KV bucket.

In A1111 options are global: setting ``sd_model_checkpoint`` switches the model for
everyone. Here each key has its own, shared by every edge, and only
``sd_model_checkpoint`` changes what headrace does (the model of the key's later image
requests) and ``show_progress_every_n_steps`` (live previews in ``/sdapi/v1/progress``).
Other options are stored and returned as given, so clients that read back what they wrote
keep working.
"""

from __future__ import annotations

from typing import Any

import nats.errors
import nats.js.errors
import orjson
from nats.js import JetStreamContext

from schemas.errors import InvalidRequest, Unavailable
from schemas.subjects import OPTIONS_BUCKET

CHECKPOINT = "sd_model_checkpoint"
PREVIEW_EVERY = "show_progress_every_n_steps"
MAX_OPTIONS_BYTES = 64 * 1024  # the bucket's max_value_size (nats/buckets/options.json)


class Options:
    """Reads and writes one key's options."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js

    async def get(self, key_id: str) -> dict[str, Any]:
        """The key's stored options ({} when it never set any)."""
        try:
            kv = await self.js.key_value(OPTIONS_BUCKET)
            entry = await kv.get(key_id)
        except nats.js.errors.KeyNotFoundError:
            return {}
        except (nats.js.errors.Error, nats.errors.Error) as e:
            raise Unavailable("options are not reachable right now") from e
        value = orjson.loads(entry.value or b"{}")
        return value if isinstance(value, dict) else {}

    async def update(self, key_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Merge ``changes`` into the key's options; returns the result."""
        merged = {**await self.get(key_id), **changes}
        data = orjson.dumps(merged)
        if len(data) > MAX_OPTIONS_BYTES:
            raise InvalidRequest(f"options are limited to {MAX_OPTIONS_BYTES} bytes per key")
        try:
            kv = await self.js.key_value(OPTIONS_BUCKET)
            await kv.put(key_id, data)
        except (nats.js.errors.Error, nats.errors.Error) as e:
            raise Unavailable("options could not be stored right now") from e
        return merged
