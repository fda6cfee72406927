"""What travels with one prediction through every layer: ids, caller, deadline, trace context."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class RequestContext:
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    tenant: str | None = None
    principal: str | None = None  # who called, once the edge authenticated them (audit trail)
    deadline: float | None = None  # time.monotonic() after which the work is useless
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    traceparent: str | None = None
    priority: int = 0  # 0 = default; 1 is the highest of the model's priority levels
    parameters: Mapping[str, Any] = field(default_factory=dict)  # the V2 request's parameters
    pattern: str = "online"  # online | stream | batch: which access pattern asked (for the audit)
    # The recording span this request's work goes under (observability/tracing.py); None: the
    # request is not traced (tracing off or not sampled), and nothing below makes spans.
    span: Any = None
