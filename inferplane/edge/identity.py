"""Who is calling: the principal and tenant every authenticated request carries."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    tenant: str
    method: str  # "key", "jwt" or "mtls": how the caller proved who they are
    # Scopes the credential itself carries (a key's record, a token's scope claim, an mtls rule),
    # valid on `targets`; the access file's grants add to them.
    scopes: frozenset[str] = frozenset()
    targets: tuple[str, ...] = ("*",)
