"""`inferplane audit`: print audit records (which model version answered which request)."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated

import typer

from inferplane.errors import BadRequest, NotFound
from inferplane.observability.audit import DEFAULT_SINK, AuditRecord

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhd])\s*$", re.IGNORECASE)


def parse_since(text: str) -> float:
    """Seconds in a duration such as 30s, 10m, 1.5h or 7d."""
    match = _DURATION.match(text)
    if not match:
        raise BadRequest(
            f"--since '{text}' is not a duration; use a number and a unit s, m, h or d "
            "(30s, 10m, 2h, 7d)"
        )
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


def iso_utc(epoch_s: float) -> str:
    return (
        datetime.fromtimestamp(epoch_s, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def audit_command(
    sink: Annotated[
        str,
        typer.Option(
            "--db",
            "--sink",
            envvar="INFERPLANE_AUDIT",
            help="Audit sink to read: a SQLite file, sqlite:PATH, jsonl:PATH, parquet:DIR or "
            "kafka://HOST:PORT/TOPIC (read from the start to the end of now).",
        ),
    ] = DEFAULT_SINK,
    request_id: Annotated[
        str | None, typer.Option("--request-id", help="Only this request's record(s).")
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(help="Only records of requests that arrived in the last 30s, 10m, 2h, 7d."),
    ] = None,
    service: Annotated[
        str | None, typer.Option(help="Only requests for this service (or model name).")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Only answers from this model.")] = None,
    status: Annotated[int | None, typer.Option(help="Only this status, e.g. 200 or 503.")] = None,
    principal: Annotated[
        str | None, typer.Option(help="Only requests of this authenticated caller.")
    ] = None,
    trace_id: Annotated[
        str | None, typer.Option(help="Only requests of this W3C trace (32 hex digits).")
    ] = None,
    kind: Annotated[
        str | None,
        typer.Option(
            help="Only records of this kind: prediction, or rollout (the rollout controller's "
            "decisions, docs/rollouts.md)."
        ),
    ] = None,
    limit: Annotated[int, typer.Option(help="Print at most the latest N records.")] = 100,
    json_lines: Annotated[
        bool, typer.Option("--json", help="One JSON object per line instead of a table.")
    ] = False,
) -> None:
    """Print audit records (oldest first): who asked, which model version answered, how."""
    from inferplane.observability.audit import query

    if limit < 1:
        raise BadRequest(f"--limit must be >= 1, got {limit}")
    since_s = None if since is None else parse_since(since)
    try:
        records = query(
            sink,
            request_id=request_id,
            since_s=since_s,
            service=service,
            model=model,
            status=status,
            principal=principal,
            trace_id=trace_id,
            kind=kind,
            limit=limit,
        )
    except NotFound as exc:
        raise NotFound(f"{exc.message} (choose the sink with --db or INFERPLANE_AUDIT)") from None
    if json_lines:
        import orjson

        out = sys.stdout.buffer
        for rec in records:
            out.write(orjson.dumps({**asdict(rec), "time_iso": iso_utc(rec.time)}) + b"\n")
        out.flush()
        return
    _print_table(records, sink)


def _print_table(records: list[AuditRecord], sink: str) -> None:
    from rich.console import Console
    from rich.table import Table

    # Piped output keeps whole rows for grep; a terminal gets a table that fits its width.
    console = Console() if sys.stdout.isatty() or "COLUMNS" in os.environ else Console(width=250)
    if not records:
        Console(stderr=True).print(f"no audit records match in {sink}", highlight=False)
        return
    with_errors = any(r.error for r in records)
    # Like the error column, only there when some record has one (a server without auth has none).
    with_principals = any(r.principal for r in records)
    table = Table(title=f"audit records in {sink}")
    table.add_column("time (UTC)", no_wrap=True)
    table.add_column("request id", no_wrap=True)
    if with_principals:
        table.add_column("principal")
    for col in ("tenant", "service", "model", "version", "route"):
        table.add_column(col)
    table.add_column("latency ms", justify="right")
    table.add_column("status", justify="right")
    if with_errors:
        table.add_column("error")
    for r in records:
        row = [iso_utc(r.time), r.request_id]
        if with_principals:
            row.append(r.principal or "-")
        row += [
            r.tenant or "-",
            r.service,
            r.model or "-",
            r.version or "-",
            r.route,
            f"{r.latency_ms:.2f}",
            str(r.status),
        ]
        if with_errors:
            row.append(r.error or "")
        table.add_row(*row, style=None if r.status < 400 else "red")
    console.print(table)
