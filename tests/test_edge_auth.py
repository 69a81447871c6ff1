"""Keys: where they come from, how they are kept, and that the edge never runs open."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from edge.app import build_app
from edge.auth import KeyStore, bearer, load_keys_file
from edge.settings import EdgeSettings


def test_keys_from_env_and_the_api_tokens_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEADRACE_API_KEYS", raising=False)
    monkeypatch.setenv("API_TOKENS", "one, two")
    store = KeyStore.from_settings(EdgeSettings())
    assert len(store) == 2
    assert store.authenticate("two") is not None
    assert store.authenticate("three") is None
    assert all("two" not in repr(k) for k in store.keys)  # only digests are kept


def test_keys_file_holds_digests_only(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"s3cret").hexdigest()
    path = tmp_path / "keys.toml"
    path.write_text(f'[[keys]]\nname = "alice"\nsha256 = "{digest}"\n')
    store = KeyStore.from_settings(EdgeSettings(api_keys="", keys_file=path))
    key = store.authenticate("s3cret")
    assert key is not None
    assert key.name == "alice"
    assert key.id == f"key-{digest[:12]}"


def test_malformed_keys_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text('[[keys]]\nname = "bob"\nsha256 = "abc"\n')
    with pytest.raises(ValueError, match="hex sha256"):
        load_keys_file(path)


def test_the_edge_refuses_to_start_without_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEADRACE_API_KEYS", raising=False)
    monkeypatch.delenv("API_TOKENS", raising=False)
    with pytest.raises(ValueError, match="no API keys"):
        build_app(EdgeSettings())


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("Basic abc", None),
        ("Bearer ", None),
        (None, None),
    ],
)
def test_bearer_header_parsing(header: str | None, token: str | None) -> None:
    assert bearer(header) == token
