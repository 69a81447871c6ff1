"""Bearer keys: stored and compared as SHA-256 digests, in constant time."""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from dataclasses import dataclass
from pathlib import Path

from edge.settings import EdgeSettings


def digest(secret: str) -> bytes:
    """The stored form of a key."""
    return hashlib.sha256(secret.encode()).digest()


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A caller's identity: ``id`` is safe to log and to put in headers; the secret is never kept."""

    id: str
    name: str
    sha256: bytes


class KeyStore:
    """The keys the edge accepts."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self.keys = keys

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def from_settings(cls, settings: EdgeSettings) -> KeyStore:
        """Keys from ``HEADRACE_API_KEYS`` (or ``API_TOKENS``) and the keys file."""
        keys = []
        for secret in (s.strip() for s in settings.api_keys.split(",")):
            if secret:
                d = digest(secret)
                keys.append(ApiKey(id=f"key-{d.hex()[:12]}", name="env", sha256=d))
        if settings.keys_file is not None:
            keys.extend(load_keys_file(settings.keys_file))
        return cls(keys)

    def authenticate(self, secret: str) -> ApiKey | None:
        """The key with this secret, comparing against every key so timing tells nothing."""
        presented = digest(secret)
        found = None
        for key in self.keys:
            if hmac.compare_digest(key.sha256, presented):
                found = key
        return found


def load_keys_file(path: Path) -> list[ApiKey]:
    """``[[keys]]`` tables with ``name`` and ``sha256`` (hex digest of the secret)."""
    data = tomllib.loads(path.read_text())
    keys = []
    for i, entry in enumerate(data.get("keys", [])):
        try:
            name, hexdigest = str(entry["name"]), str(entry["sha256"])
            sha = bytes.fromhex(hexdigest)
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}: keys[{i}] needs name and a hex sha256") from e
        if len(sha) != 32:
            raise ValueError(f"{path}: keys[{i}].sha256 is not a SHA-256 digest")
        keys.append(ApiKey(id=f"key-{hexdigest[:12]}", name=name, sha256=sha))
    return keys


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
