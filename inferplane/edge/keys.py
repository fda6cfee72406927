"""API keys: created once, shown once, stored only as a SHA-256 digest in a YAML file.

A key reads `ipk_<id>_<secret>`: the id (12 hex digits) finds the record without scanning, the
secret is 32 random bytes. Keys are machine-made and carry 256 bits of entropy, so a plain
SHA-256 is as safe to store as a slow password hash (argon2/scrypt exist to stretch guessable
passwords; nothing here is guessable) and costs a microsecond instead of tens of milliseconds
on every request. Digests are compared in constant time.

The file (`keys: keys.yaml` in the access file) is rewritten atomically by `inferplane keys` and
re-read by a running server when it changes, so creating or revoking a key needs no restart.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import os
import re
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from inferplane.edge.access import SCOPES, _check_scopes, first_problem, read_yaml
from inferplane.errors import BadRequest, NotFound, Unauthenticated

PREFIX = "ipk_"
_KEY = re.compile(r"^ipk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$")


class KeyRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[0-9a-f]{12}$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    principal: str
    tenant: str
    scopes: list[str]
    targets: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    created_at: str = ""
    revoked_at: str | None = None
    description: str = ""

    _scopes = field_validator("scopes")(classmethod(lambda cls, v: _check_scopes(v)))


class KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyRecord] = Field(default_factory=list)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_keys(doc: Any, where: str) -> dict[str, KeyRecord]:
    if doc is None:
        doc = {}
    try:
        parsed = KeyFile.model_validate(doc)
    except ValidationError as exc:
        raise first_problem(exc, where) from None
    records: dict[str, KeyRecord] = {}
    for record in parsed.keys:
        if record.id in records:
            raise BadRequest(f"{where}: key id {record.id} appears twice")
        records[record.id] = record
    return records


def read_keys(path: Path) -> dict[str, KeyRecord]:
    """The key records of `path` by id; a file that does not exist yet holds none."""
    return parse_keys(read_yaml(path, "keys file", missing_ok=True), str(path))


def write_keys(path: Path, records: dict[str, KeyRecord]) -> None:
    """Atomically, readable by the owner only (the digests are not secrets, but who holds which
    key and with which scopes is nobody else's business)."""
    doc = {"keys": [r.model_dump(exclude_none=True) for r in records.values()]}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".keys-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write("# API keys of inferplane (SHA-256 digests); edit with `inferplane keys`\n")
            yaml.safe_dump(doc, out, sort_keys=False)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclass
class NewKey:
    key: str  # shown once
    record: KeyRecord


def create_key(
    path: Path,
    *,
    tenant: str,
    scopes: list[str],
    principal: str | None = None,
    targets: list[str] | None = None,
    description: str = "",
) -> NewKey:
    for what, value in (("tenant", tenant), ("principal", principal or tenant)):
        if not _NAME.match(value):
            raise BadRequest(
                f"{what} {value!r}: use letters, digits and . _ @ : - (at most 128 characters)"
            )
    if not scopes:
        raise BadRequest(f"give at least one scope ({', '.join(SCOPES)})")
    try:
        _check_scopes(scopes)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    records = read_keys(path)
    key_id = secrets.token_hex(6)
    while key_id in records:
        key_id = secrets.token_hex(6)
    key = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    record = KeyRecord(
        id=key_id,
        sha256=digest(key),
        principal=principal or f"{tenant}-{key_id[:4]}",
        tenant=tenant,
        scopes=scopes,
        targets=targets or ["*"],
        created_at=_now(),
        description=description,
    )
    records[key_id] = record
    write_keys(path, records)
    return NewKey(key, record)


def revoke_key(path: Path, key_id: str) -> KeyRecord:
    records = read_keys(path)
    record = records.get(key_id)
    if record is None:
        raise NotFound(f"no key with id {key_id} in {path}")
    if record.revoked_at is None:
        record.revoked_at = _now()
        write_keys(path, records)
    return record


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class KeyStore:
    """The records in force; `check` maps a presented key to its record or says why not."""

    records: dict[str, KeyRecord] = field(default_factory=dict)

    def check(self, key: str) -> KeyRecord:
        match = _KEY.match(key)
        if match is None:
            raise Unauthenticated("malformed API key")
        record = self.records.get(match.group(1))
        if record is None or not hmac.compare_digest(record.sha256, digest(key)):
            raise Unauthenticated("unknown API key")
        if record.revoked_at is not None:
            raise Unauthenticated(f"API key {record.id} was revoked at {record.revoked_at}")
        return record


def looks_like_key(token: str) -> bool:
    return token.startswith(PREFIX)
