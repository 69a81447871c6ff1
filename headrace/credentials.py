"""NATS users of a deployment: passwords made once into a directory, kept, rotated on demand.

The directory (0700, every file 0600) holds:

* ``users.json``: the source of truth: each user's password, its bcrypt hash and, for a
  native client, the models it may use;
* ``nats-users.conf``: the ``authorization`` block for nats-server, with bcrypt hashes only
  (nats-server compares a password against a ``$2...`` hash itself), included by the server
  configuration of ``headrace up`` and by compose's ``nats/cluster/node.conf``;
* ``<user>.env``: ``HEADRACE_NATS_USER`` and ``HEADRACE_NATS_PASSWORD`` of one user, for a
  process of that role (compose's ``env_file``, ``--nats-creds``) or a native client;
* ``gateway.json``: the password the clusters of a super-cluster present to each other's
  gateways (``gateway.authorization``), made the first time it is asked for.

In a super-cluster the same users log in to every region (and leaf nodes log in as one of
them): ``regions`` widens each role's permissions to every region's streams.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt
import orjson
from pydantic import SecretStr

from schemas import permissions
from schemas.permissions import ROLES, Permissions

USERS_FILE = "users.json"
SERVER_CONF = "nats-users.conf"
# nats-server's own `nats server passwd` uses cost 11: about 0.1 s of the server's CPU per
# connect, paid once per connection.
BCRYPT_COST = 11


@dataclass(frozen=True)
class User:
    """One NATS user: its password, the password's hash, and a native client's models."""

    name: str
    password: str = field(repr=False)
    hashed: str = field(repr=False)
    models: tuple[str, ...] | None = None  # None: one of the fixed roles

    @property
    def permissions(self) -> Permissions:
        """What this user may publish and subscribe to (one region)."""
        return self.permissions_in(())

    def permissions_in(self, regions: Sequence[str]) -> Permissions:
        """What this user may publish and subscribe to in a super-cluster of ``regions``."""
        if self.models is None:
            return permissions.for_role(self.name, regions)
        return permissions.native_client(self.name, self.models, regions)


def _new_user(name: str, models: tuple[str, ...] | None, cost: int) -> User:
    password = secrets.token_urlsafe(32)
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode()
    return User(name, password, hashed, models)


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, never readable by others even for a moment."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)  # a file that existed with looser bits keeps them through O_CREAT


class Credentials:
    """The users in one credentials directory."""

    def __init__(
        self, directory: Path, users: Mapping[str, User], regions: Sequence[str] = ()
    ) -> None:
        self.directory = directory
        self.users = dict(users)
        self.regions = tuple(regions)

    @classmethod
    def ensure(
        cls,
        directory: Path,
        clients: Mapping[str, Sequence[str]] | None = None,
        *,
        rotate: Iterable[str] = (),
        cost: int = BCRYPT_COST,
        regions: Sequence[str] = (),
    ) -> Credentials:
        """Load the directory, add missing roles and ``clients`` (name → models), give the
        users in ``rotate`` new passwords, and write every file back."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        directory.chmod(0o700)
        users = cls._load(directory / USERS_FILE)
        rotate = set(rotate)
        unknown = rotate - set(users) - set(ROLES) - set(clients or {})
        if unknown:
            raise ValueError(f"no such NATS user to rotate: {', '.join(sorted(unknown))}")
        wanted: dict[str, tuple[str, ...] | None] = dict.fromkeys(ROLES)
        wanted |= {name: u.models for name, u in users.items() if u.models is not None}
        wanted |= {name: tuple(models) for name, models in (clients or {}).items()}
        for name, models in wanted.items():
            current = users.get(name)
            if current is None or name in rotate:
                users[name] = _new_user(name, models, cost)
            elif current.models != models:
                users[name] = User(name, current.password, current.hashed, models)
            users[name].permissions  # noqa: B018 - raises ValueError for a bad name or model
        creds = cls(directory, users, regions)
        creds._write()
        return creds

    @staticmethod
    def _load(path: Path) -> dict[str, User]:
        if not path.exists():
            return {}
        data = orjson.loads(path.read_bytes())
        return {
            name: User(
                name,
                entry["password"],
                entry["bcrypt"],
                None if entry.get("models") is None else tuple(entry["models"]),
            )
            for name, entry in data["users"].items()
        }

    def _write(self) -> None:
        users = {
            u.name: {"password": u.password, "bcrypt": u.hashed, "models": u.models}
            for u in self.users.values()
        }
        _write_private(self.directory / USERS_FILE, json.dumps({"users": users}, indent=2) + "\n")
        _write_private(self.directory / SERVER_CONF, self.authorization())
        for user in self.users.values():
            _write_private(self.directory / f"{user.name}.env", _env_text(self.env(user.name)))

    def password(self, user: str) -> SecretStr:
        """The password of ``user``."""
        return SecretStr(self.users[user].password)

    def env(self, user: str) -> dict[str, str]:
        """The variables that make a headrace process connect as ``user``."""
        return {"HEADRACE_NATS_USER": user, "HEADRACE_NATS_PASSWORD": self.users[user].password}

    def login(self, user: str) -> dict[str, object]:
        """Settings fields that make a headrace process connect as ``user``."""
        return {"nats_user": user, "nats_password": self.password(user)}

    def authorization(self, extra_users: Sequence[Mapping[str, object]] = ()) -> str:
        """The ``authorization`` block of nats-server's configuration (JSON is a subset of
        its format). Anonymous clients are refused: there is no ``no_auth_user``."""
        entries: list[Mapping[str, object]] = [
            {
                "user": u.name,
                "password": u.hashed,
                "permissions": u.permissions_in(self.regions).as_config(),
            }
            for u in self.users.values()
        ]
        block = {"users": [*entries, *extra_users]}
        header = "# Generated by headrace (headrace/credentials.py) from users.json: do not edit.\n"
        return header + "authorization: " + json.dumps(block, indent=2) + "\n"


GATEWAY_FILE = "gateway.json"
GATEWAY_USER = "gateway"


def gateway_password(directory: Path) -> str:
    """The password of gateway connections between the regions of a super-cluster: made once
    into ``gateway.json`` (0600) and kept. Every region's server presents it and requires it
    (``gateway.authorization``), so no server outside the deployment joins the super-cluster."""
    path = Path(directory) / GATEWAY_FILE
    if path.exists():
        password: str = orjson.loads(path.read_bytes())["password"]
        return password
    password = secrets.token_urlsafe(32)
    _write_private(path, json.dumps({"user": GATEWAY_USER, "password": password}) + "\n")
    return password


GATEWAYS_CONF = "gateways.conf"
LEAF_REMOTE_CONF = "leaf-remote.conf"


def write_gateways(directory: Path, peers: Mapping[str, str]) -> Path:
    """``gateways.conf``: the gateway block's authorization and remotes of a region's
    servers (compose's nats/region/node.conf includes it), ``peers`` naming each region's
    gateway address (``host:port``). Every region gets the same file: nats-server skips the
    entry that names its own region."""
    password = gateway_password(directory)
    remotes = [
        {"name": region, "urls": [f"nats://{GATEWAY_USER}:{password}@{address}"]}
        for region, address in peers.items()
    ]
    auth = {"user": GATEWAY_USER, "password": password}
    text = (
        "# Generated by headrace auth --gateway: the gateway password is in here (0600).\n"
        f"authorization: {json.dumps(auth)}\ngateways: {json.dumps(remotes, indent=2)}\n"
    )
    path = Path(directory) / GATEWAYS_CONF
    _write_private(path, text)
    return path


def write_leaf_remote(directory: Path, hub: str, user: str, password: str) -> Path:
    """``leaf-remote.conf``: the ``leafnodes`` block of a leaf site (compose.leaf.yaml),
    dialling ``hub`` (``host:port`` of its region's leafnode port) as ``user``."""
    remote = {"urls": [f"nats-leaf://{user}:{password}@{hub}"]}
    text = (
        "# Generated by headrace auth --leaf-hub: a worker user's password is in here (0600).\n"
        f"leafnodes: {json.dumps({'remotes': [remote]})}\n"
    )
    path = Path(directory) / LEAF_REMOTE_CONF
    _write_private(path, text)
    return path


def _env_text(env: Mapping[str, str]) -> str:
    return "".join(f"{k}={v}\n" for k, v in env.items())
