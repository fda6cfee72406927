"""`inferplane models list|show --server URL`: what a running server holds in memory, read from its
`GET /inferplane/models` (state, measured footprint, pinning, idle time, loads, the budget)."""

from __future__ import annotations

import os
from typing import Any

import httpx
from rich.table import Table

from inferplane.errors import InferplaneError
from inferplane.sizes import format_size

API_KEY_ENV = "INFERPLANE_API_KEY"  # sent as x-api-key when the server has an --access file


def fetch_residency(server: str, model: str | None = None) -> dict[str, Any]:
    """The server's residency report (of one model when `model` is given)."""
    url = server.rstrip("/") + "/inferplane/models" + (f"/{model}" if model else "")
    key = os.environ.get(API_KEY_ENV)
    try:
        answer = httpx.get(url, headers={"x-api-key": key} if key else {}, timeout=10)
    except httpx.HTTPError as exc:
        raise InferplaneError(f"cannot reach {server}: {exc}") from None
    if answer.status_code != 200:
        try:
            message = answer.json().get("error", answer.text)
        except ValueError:
            message = answer.text
        raise InferplaneError(f"{server} answered {answer.status_code}: {message}")
    report: dict[str, Any] = answer.json()
    return report


def _size(n: int | None) -> str:
    return "-" if n is None else format_size(n)


def summary_line(report: dict[str, Any]) -> str:
    budget = report.get("memory_budget_bytes")
    used = format_size(report.get("resident_bytes") or 0)
    of = f" of a {format_size(budget)} budget" if budget else " (no budget)"
    return (
        f"{report.get('models_resident', 0)} versions loaded, {used}{of}; "
        f"load: {report.get('load')}"
    )


def residency_table(report: dict[str, Any], title: str) -> Table:
    table = Table(title=title)
    for col in ("model", "version", "state", "footprint", "pinned", "idle", "loads", "reason"):
        table.add_column(col)
    for row in report.get("versions", []):
        pinned = "pinned" if row.get("pinned") else "held" if row.get("held") else ""
        idle = row.get("idle_s")
        table.add_row(
            row["name"],
            row["version"],
            row["state"],
            _size(row.get("footprint_bytes")),
            pinned,
            "-" if idle is None else f"{idle:.0f} s",
            str(row.get("loads", 0)),
            row.get("reason", ""),
        )
    return table


def footprint_rows(row: dict[str, Any]) -> list[tuple[str, str]]:
    """`models show --server`: one version's residency as (field, value) rows."""
    source = row.get("last_load_source") or "-"
    return [
        ("state", f"{row['state']}" + (f" ({row['reason']})" if row.get("reason") else "")),
        ("footprint", _size(row.get("footprint_bytes"))),
        ("memory hint", _size(row.get("memory_hint_bytes"))),
        ("budgeted", _size(row.get("reserved_bytes"))),
        ("pinned/held", f"{bool(row.get('pinned'))} / {bool(row.get('held'))}"),
        ("idle unload", "-" if not row.get("idle_unload_s") else f"{row['idle_unload_s']:g} s"),
        ("loads", f"{row.get('loads', 0)} (last {row.get('last_load_seconds', 0)} s, {source})"),
    ]
