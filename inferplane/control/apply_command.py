"""`inferplane apply -f platform.yaml`: placeholder until the reconciler lands."""

from __future__ import annotations

from inferplane.errors import BadRequest


def apply_command() -> None:
    """Reconcile the repository with a platform file (not yet implemented)."""
    raise BadRequest("inferplane apply is not implemented yet")
