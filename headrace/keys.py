"""``headrace keys add``: a new API key, printed once; the keys file keeps only its SHA-256."""

from __future__ import annotations

import json
import os
import re
import secrets
import tomllib
from pathlib import Path

from edge.auth import LIMIT_FIELDS, ApiKey, digest, load_keys_file

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


def new_secret() -> str:
    """A new key: 256 random bits, URL-safe."""
    return f"hr-{secrets.token_urlsafe(32)}"


def _string(value: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's; non-ASCII stays as UTF-8)."""
    return json.dumps(value, ensure_ascii=False)


def render(name: str, secret: str, limits: dict[str, int | None], models: list[str] | None) -> str:
    """The ``[[keys]]`` table of a key."""
    lines = ["[[keys]]", f"name = {_string(name)}", f'sha256 = "{digest(secret).hex()}"']
    lines += [f"{field} = {limits[field]}" for field in LIMIT_FIELDS if limits.get(field)]
    if models is not None:
        lines.append(f"models = [{', '.join(_string(m) for m in models)}]")
    return "\n".join(lines) + "\n"


def add(
    path: Path,
    name: str,
    *,
    limits: dict[str, int | None] | None = None,
    models: list[str] | None = None,
) -> tuple[str, ApiKey]:
    """Append a new key to ``path`` (created 0600 if missing); returns its secret and entry."""
    if not _NAME.match(name):
        raise ValueError("a key name is 1-64 letters, digits, '.', '_', '@' or '-'")
    limits = limits or {}
    for field, value in limits.items():
        if value is not None and value < 1:
            raise ValueError(f"{field} must be a positive integer")
    existing = load_keys_file(path) if path.exists() else []
    if any(k.name == name for k in existing):
        raise ValueError(f"{path} already has a key named {name!r}")
    secret = new_secret()
    table = render(name, secret, limits, models)
    tomllib.loads(table)  # never write a file the edge would refuse
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else ""
    separator = (
        "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as out:
        out.write(separator + table)
    (entry,) = [k for k in load_keys_file(path) if k.name == name]
    return secret, entry
