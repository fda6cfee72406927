"""`inferplane keys create | list | revoke`: API keys of an access file, shown once, stored hashed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.table import Table

from inferplane.edge.access import beside, read_access
from inferplane.edge.keys import create_key, read_keys, revoke_key
from inferplane.errors import BadRequest

console = Console()
err_console = Console(stderr=True)

AccessOpt = Annotated[
    str,
    typer.Option(
        "--access",
        envvar="INFERPLANE_ACCESS",
        help="Access file whose keys file (its `keys:` entry, default keys.yaml beside it) holds "
        "the keys; created with that default when missing.",
    ),
]


def _keys_path(access: str, create: bool = False) -> Path:
    path = Path(access)
    if not path.exists():
        if not create:
            raise BadRequest(f"access file {path} does not exist")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "# inferplane access rules (docs/security.md)\n"
            + yaml.safe_dump({"keys": "keys.yaml", "grants": [], "quotas": []}, sort_keys=False)
        )
        err_console.print(f"created {path}", highlight=False)
    spec = read_access(path)
    if spec.keys is None:
        raise BadRequest(f"{path} turns API keys off (keys: null); name a keys file there")
    return beside(path, spec.keys)


def _split(values: str | None) -> list[str]:
    return [v.strip() for v in (values or "").split(",") if v.strip()]


def create_command(
    tenant: Annotated[str, typer.Option(help="The tenant the key's requests belong to.")],
    scopes: Annotated[str, typer.Option(help="Comma list of infer, read, admin.")],
    access: AccessOpt = "./access.yaml",
    principal: Annotated[
        str | None, typer.Option(help="Name of the caller in the audit; default <tenant>-<id>.")
    ] = None,
    targets: Annotated[
        str, typer.Option(help="Comma list of model/service name patterns the scopes cover.")
    ] = "*",
    description: Annotated[str, typer.Option(help="A note kept beside the key.")] = "",
) -> None:
    """Create a key and print it ONCE; only its SHA-256 digest is stored."""
    path = _keys_path(access, create=True)
    new = create_key(
        path,
        tenant=tenant,
        scopes=_split(scopes),
        principal=principal,
        targets=_split(targets) or ["*"],
        description=description,
    )
    r = new.record
    err_console.print(
        f"key {r.id} for principal {r.principal} (tenant {r.tenant}, scopes "
        f"{','.join(r.scopes)} on {','.join(r.targets)}) stored in {path}; it is shown only "
        "now, send it as 'Authorization: Bearer <key>':",
        highlight=False,
        soft_wrap=True,
    )
    print(new.key)  # alone on stdout, for scripts: KEY=$(inferplane keys create ...)


def list_command(access: AccessOpt = "./access.yaml") -> None:
    """The keys of an access file (ids and grants; the keys themselves are not kept)."""
    path = _keys_path(access)
    table = Table(title=f"API keys in {path}")
    for col in ("id", "principal", "tenant", "scopes", "targets", "created", "revoked"):
        table.add_column(col)
    for r in read_keys(path).values():
        table.add_row(
            r.id, r.principal, r.tenant, ",".join(r.scopes), ",".join(r.targets), r.created_at,
            r.revoked_at or "-",
        )  # fmt: skip
    console.print(table)


def revoke_command(
    key_id: Annotated[str, typer.Argument(help="The key's id (the 12 hex digits after ipk_).")],
    access: AccessOpt = "./access.yaml",
) -> None:
    """Revoke a key: a running server refuses it within about a second."""
    path = _keys_path(access)
    record = revoke_key(path, key_id.removeprefix("ipk_").split("_")[0])
    console.print(f"revoked key {record.id} ({record.principal}) at {record.revoked_at}")
