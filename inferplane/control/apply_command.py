"""`inferplane apply -f platform.yaml [--dry-run] [--diff] [--prune]`: reconcile the repository
with a platform file (docs/apply.md). Exit 0 when applied or nothing changed, 2 (through the
CLI's one_line_errors) when the file or the repository refuses it."""

from __future__ import annotations

import os
import tempfile
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from inferplane.errors import BadRequest

_STYLE = {"+": "green", "-": "red", "~": "yellow"}


def _line(console: Console, text: str) -> None:
    style = _STYLE.get(text[:1])
    shown = escape(text)
    console.print(
        f"[{style}]{shown}[/{style}]" if style else shown, highlight=False, soft_wrap=True
    )


def _repository_url(option: str | None, from_file: str | None, base_dir: str) -> str:
    if option:
        return option
    if not from_file:
        raise BadRequest(
            "no repository: give --repository/-r, set INFERPLANE_REPOSITORY, or put "
            "`repository:` in the platform file"
        )
    if "://" in from_file or os.path.isabs(from_file):
        return from_file
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(from_file)))


def apply_command(
    file: Annotated[
        str,
        typer.Option(
            "--file", "-f", help="The platform file (docs/apply.md); '-' reads standard input."
        ),
    ],
    repository: Annotated[
        str | None,
        typer.Option(
            "--repository",
            "-r",
            envvar="INFERPLANE_REPOSITORY",
            help="Model repository (a folder or any fsspec URL); overrides the file's "
            "`repository:`.",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show the plan and write nothing.")
    ] = False,
    diff: Annotated[
        bool, typer.Option("--diff", help="Also print a unified diff of services.yaml.")
    ] = False,
    prune: Annotated[
        bool,
        typer.Option(
            "--prune",
            help="Delete versions of the file's models that the file leaves out (never one an "
            "alias or a service still uses); same as `prune: true` in the file.",
        ),
    ] = False,
) -> None:
    """Reconcile the model repository with a platform file: register missing versions, move
    aliases, write services.yaml; refuse what would change an existing version."""
    from inferplane.control.manifest import load_manifest
    from inferplane.control.reconcile import apply_plan, make_plan
    from inferplane.repository.store import Repository

    console = Console(highlight=False)
    manifest = load_manifest(file)
    url = _repository_url(repository, manifest.platform.repository, manifest.base_dir)
    repo = Repository(url)
    with tempfile.TemporaryDirectory(prefix="inferplane-apply-") as staging:
        plan = make_plan(manifest, repo, staging, prune=prune)
        for note in plan.notes:
            console.print(f"[dim]# {escape(note)}[/dim]", soft_wrap=True)
        if not plan.lines:
            console.print(f"no changes: {escape(url)} matches {escape(manifest.source)}")
            return
        for text in plan.lines:
            _line(console, text)
        if diff:
            for text in plan.services_diff():
                _line(console, text.rstrip("\n"))
        changes = plan.changes
        noun = "change" if changes == 1 else "changes"
        if dry_run:
            console.print(f"dry run: {changes} {noun} planned, nothing written to {escape(url)}")
            return
        apply_plan(plan)
        console.print(f"applied {changes} {noun} to {escape(url)}")
