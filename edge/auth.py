"""API keys: stored and compared as SHA-256 digests, in constant time, with per-key limits.

A caller presents its key as a Bearer token or as the password of HTTP Basic (what A1111
clients send); a request with no ``Authorization`` header at all is served as the
anonymous key when ``HEADRACE_ANONYMOUS_KEY`` names one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.ratelimit.limits import Limits
from edge.settings import EdgeSettings
from schemas.errors import ModelNotFound

# Limit fields of a ``[[keys]]`` table (absent: unlimited).
LIMIT_FIELDS = ("rpm", "tpm", "max_parallel", "image_budget")


def digest(secret: str) -> bytes:
    """The stored form of a key."""
    return hashlib.sha256(secret.encode()).digest()


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A caller's identity: ``id`` is safe to log and to put in headers; the secret is never kept."""

    id: str
    name: str
    sha256: bytes
    limits: Limits = field(default_factory=Limits)
    models: frozenset[str] | None = None  # None: every model

    def allows(self, model: str) -> bool:
        """May this key use ``model``?"""
        return self.models is None or model in self.models

    def check(self, model: str) -> None:
        """Raise ModelNotFound for a model this key may not use (it cannot tell them apart)."""
        if not self.allows(model):
            raise ModelNotFound(
                f"The model '{model}' does not exist or you do not have access to it"
            )


class KeyStore:
    """The keys the edge accepts."""

    def __init__(self, keys: list[ApiKey], anonymous: ApiKey | None = None) -> None:
        self.keys = keys
        self.anonymous = anonymous  # who a request without credentials is; None: nobody

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def limited(self) -> bool:
        """True when some key has a rate limit (the edge then needs Redis)."""
        return any(k.limits.any for k in self.keys)

    @classmethod
    def from_settings(cls, settings: EdgeSettings) -> KeyStore:
        """Keys from ``HEADRACE_API_KEYS`` (with the ``HEADRACE_DEFAULT_*`` limits) and the keys file."""
        defaults = Limits(
            rpm=settings.default_rpm,
            tpm=settings.default_tpm,
            max_parallel=settings.default_max_parallel,
        )
        keys = []
        for secret in (s.strip() for s in settings.api_keys.split(",")):
            if secret:
                d = digest(secret)
                keys.append(ApiKey(id=f"key-{d.hex()[:12]}", name="env", sha256=d, limits=defaults))
        if settings.keys_file is not None:
            keys.extend(load_keys_file(settings.keys_file))
        anonymous = None
        if settings.anonymous_key is not None:
            anonymous = _named(keys, settings.anonymous_key)
        return cls(keys, anonymous)

    def authenticate(self, secret: str) -> ApiKey | None:
        """The key with this secret, comparing against every key so timing tells nothing."""
        presented = digest(secret)
        found = None
        for key in self.keys:
            if hmac.compare_digest(key.sha256, presented):
                found = key
        return found


def _named(keys: list[ApiKey], name: str) -> ApiKey:
    """The one key called ``name``: anonymous callers get its limits and models, so a typo must
    not fall back to some other key (or to none)."""
    found = [k for k in keys if k.name == name]
    if len(found) != 1:
        how = "no key" if not found else f"{len(found)} keys"
        raise ValueError(
            f"HEADRACE_ANONYMOUS_KEY={name!r} names {how}: it must name exactly one key "
            "(e.g. one made with `headrace keys add`)"
        )
    return found[0]


def load_keys_file(path: Path) -> list[ApiKey]:
    """``[[keys]]`` tables: ``name``, ``sha256`` (hex digest of the secret), and optionally
    ``rpm``, ``tpm``, ``max_parallel``, ``image_budget`` (positive integers) and ``models``."""
    data = tomllib.loads(path.read_text())
    return [_key(entry, f"{path}: keys[{i}]") for i, entry in enumerate(data.get("keys", []))]


def _key(entry: dict[str, Any], where: str) -> ApiKey:
    try:
        name, hexdigest = str(entry["name"]), str(entry["sha256"])
        sha = bytes.fromhex(hexdigest)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{where} needs name and a hex sha256") from e
    if len(sha) != 32:
        raise ValueError(f"{where}.sha256 is not a SHA-256 digest")
    values = {}
    for name_ in LIMIT_FIELDS:
        value = entry.get(name_)
        if value is not None and (type(value) is not int or value < 1):
            raise ValueError(f"{where}.{name_} must be a positive integer")
        values[name_] = value
    models = entry.get("models")
    if models is not None and (
        not isinstance(models, list) or not all(isinstance(m, str) and m for m in models)
    ):
        raise ValueError(f"{where}.models must be a list of model ids")
    return ApiKey(
        id=f"key-{hexdigest.lower()[:12]}",
        name=name,
        sha256=sha,
        limits=Limits(**values),
        models=None if models is None else frozenset(models),
    )


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def basic_password(header: str | None) -> str | None:
    """The password of an ``Authorization: Basic <base64(user:password)>`` header (RFC 7617).

    A1111's ``--api-auth`` is HTTP Basic, and webuiapi (``WebUIApi(username=, password=)``) and
    the Unity Stable Diffusion integration (``useAuth``) can send nothing else: the key is the
    password, the user name is ignored.
    """
    if not header:
        return None
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    _, colon, password = decoded.partition(":")
    return password if colon and password else None


def presented_secret(header: str | None) -> str | None:
    """The key an ``Authorization`` header carries, as a Bearer token or a Basic password."""
    return bearer(header) or basic_password(header)
