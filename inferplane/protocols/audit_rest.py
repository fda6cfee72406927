"""`GET /inferplane/audit`: the latest records of the server's own audit trail, for the console
(`/console`) or a script: `?request_id=&service=&model=&status=&limit=`.

It reads the sink the server writes (`serve --audit-sink`) with the same readers as `inferplane
audit` (observability/audit_sinks.py), after flushing what the writer thread still holds, so a
request answered a moment ago is found. A server without an audit sink answers 404.

Scope: admin on every target. Audit records name every tenant's callers (principal, tenant) and
may carry redacted payloads; a read grant is per model and belongs to one tenant, so it is not
enough to see them all.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from inferplane.edge.access import ADMIN
from inferplane.errors import BadRequest, NotFound
from inferplane.observability.audit import query
from inferplane.observability.audit_command import iso_utc
from inferplane.protocols.deps import ServingDeps
from inferplane.protocols.v2_rest import EVERY_TARGET, gated, json_response

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
FLUSH_TIMEOUT_S = 1.0  # the writer wakes every 20 ms: a flush normally takes about that long
AUDIT_OFF = "audit is off: this server has no audit sink (serve --audit-sink PATH)"


def _int_param(request: Request, name: str, default: int | None, low: int, high: int) -> int | None:
    text = request.query_params.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadRequest(f"'{name}' must be an integer, got '{text}'") from None
    if not low <= value <= high:
        raise BadRequest(f"'{name}' must be within [{low}, {high}], got {value}")
    return value


def _text_param(request: Request, name: str) -> str | None:
    return request.query_params.get(name, "").strip() or None


def build_routes(deps: ServingDeps) -> list[Route]:
    async def audit_records(request: Request) -> Response:
        audit = deps.predictor.audit
        if audit is None:
            raise NotFound(AUDIT_OFF)
        limit = _int_param(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        assert limit is not None
        status = _int_param(request, "status", None, 100, 599)
        # Each sink's description is its spec (sqlite:PATH, jsonl:PATH, parquet:URL, kafka://...)
        spec = audit.sink.description
        flushed = await asyncio.to_thread(audit.flush, FLUSH_TIMEOUT_S)
        records = await asyncio.to_thread(
            query,
            spec,
            request_id=_text_param(request, "request_id"),
            service=_text_param(request, "service"),
            model=_text_param(request, "model"),
            status=status,
            limit=limit,
        )
        rows: list[dict[str, Any]] = [{**asdict(r), "time_iso": iso_utc(r.time)} for r in records]
        rows.reverse()  # newest first: what a person looking for a recent request wants on top
        return json_response(
            {
                "sink": spec,
                "flushed": flushed,
                "buffered": audit.buffered,
                "written": audit.written,
                "dropped": audit.dropped,
                "records": rows,
            }
        )

    return [
        Route("/inferplane/audit", gated(deps, ADMIN, EVERY_TARGET, audit_records), methods=["GET"])
    ]
