"""Keys with limits: the keys file, the HEADRACE_DEFAULT_* limits, and ``headrace keys add``."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest

from edge.app import build_app
from edge.auth import KeyStore, load_keys_file
from edge.ratelimit.limits import Limits
from edge.settings import EdgeSettings
from headrace.cli import main


def test_keys_file_limits_and_models(tmp_path: Path) -> None:
    sha = hashlib.sha256(b"s3cret").hexdigest()
    path = tmp_path / "keys.toml"
    path.write_text(
        f'[[keys]]\nname = "alice"\nsha256 = "{sha}"\nrpm = 60\ntpm = 1000\nmax_parallel = 2\n'
        f'image_budget = 500\nmodels = ["echo"]\n\n[[keys]]\nname = "bob"\nsha256 = "{sha[::-1]}"\n'
    )
    alice, bob = load_keys_file(path)
    assert alice.limits == Limits(rpm=60, tpm=1000, max_parallel=2, image_budget=500)
    assert alice.allows("echo")
    assert not alice.allows("SmolLM2-135M-Instruct")
    assert bob.limits == Limits()  # a file key without limits is unlimited
    assert bob.allows("anything")


@pytest.mark.parametrize(
    ("line", "error"),
    [("rpm = 0", "rpm must be a positive integer"), ("tpm = 1.5", "tpm must be"),
     ('models = "echo"', "models must be a list")],
)  # fmt: skip
def test_bad_limits_are_refused(tmp_path: Path, line: str, error: str) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(f'[[keys]]\nname = "a"\nsha256 = "{"0" * 64}"\n{line}\n')
    with pytest.raises(ValueError, match=error):
        load_keys_file(path)


def test_env_keys_get_the_default_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADRACE_API_KEYS", "one,two")
    monkeypatch.setenv("HEADRACE_DEFAULT_RPM", "100")
    monkeypatch.setenv("HEADRACE_DEFAULT_TPM", "")  # empty: unset, unlimited
    monkeypatch.setenv("HEADRACE_DEFAULT_MAX_PARALLEL", "4")
    store = KeyStore.from_settings(EdgeSettings())
    assert {k.limits for k in store.keys} == {Limits(rpm=100, max_parallel=4)}
    assert store.limited


def test_limits_without_redis_refuse_to_start() -> None:
    with pytest.raises(ValueError, match="HEADRACE_REDIS_URL"):
        build_app(EdgeSettings(api_keys="k", default_rpm=10, redis_url=""))


def test_keys_add_prints_the_key_once_and_writes_its_hash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "conf" / "keys.toml"
    argv = ["keys", "add", "alice", "--file", str(path), "--rpm", "60", "--max-parallel", "2"]
    assert main([*argv, "--model", "echo"]) == 0
    secret = capsys.readouterr().out.strip()
    assert main(["keys", "add", "bob", "--file", str(path), "--tpm", "5000"]) == 0
    bob_secret = capsys.readouterr().out.strip()
    assert secret.startswith("hr-")
    assert secret != bob_secret
    text = path.read_text()
    assert secret not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    store = KeyStore.from_settings(EdgeSettings(api_keys="", keys_file=path))
    alice = store.authenticate(secret)
    assert alice is not None
    assert alice.name == "alice"
    assert alice.limits == Limits(rpm=60, max_parallel=2)
    assert alice.models == frozenset({"echo"})
    bob = store.authenticate(bob_secret)
    assert bob is not None
    assert bob.limits == Limits(tpm=5000)
    assert main(["keys", "add", "alice", "--file", str(path)]) == 2  # names are unique
    assert "already has a key named 'alice'" in capsys.readouterr().err
