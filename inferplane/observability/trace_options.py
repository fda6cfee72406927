"""The trace options `serve`, `stream` and `batch` share (docs/observability.md "Traces")."""

from __future__ import annotations

from typing import Annotated

import typer

from inferplane.observability.tracing import PROTOCOLS, TraceSettings, settings_from_env

OtlpEndpointOpt = Annotated[
    str | None,
    typer.Option(
        help="Send OpenTelemetry traces to this OTLP endpoint (http://collector:4318 for "
        "http/protobuf; host:4317 with OTEL_EXPORTER_OTLP_PROTOCOL=grpc). Default: "
        "OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT; none: tracing off. Needs inferplane[otel].",
    ),
]
TraceSampleOpt = Annotated[
    float | None,
    typer.Option(
        min=0.0,
        max=1.0,
        help="Share of requests traced when the caller sent no sampled traceparent (a "
        "caller's sampling decision is followed). Default: OTEL_TRACES_SAMPLER_ARG, else 0.1.",
    ),
]


def trace_settings(
    endpoint: str | None, sample: float | None, service_name: str
) -> TraceSettings | None:
    """The flags over the OTEL_* variables, checked now: a bad value fails before anything
    starts, and a missing extra says what to install."""
    try:
        settings = settings_from_env(endpoint, sample, service_name)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--trace-sample") from None
    if settings is not None:
        from inferplane.errors import MissingExtra

        try:
            import opentelemetry.sdk.trace  # noqa: F401
        except ImportError:
            raise MissingExtra("opentelemetry-sdk", "otel") from None
        protocol = (settings.protocol or "http/protobuf").lower()
        if protocol not in PROTOCOLS:
            raise typer.BadParameter(
                f"OTLP protocol '{settings.protocol}' is not supported; use "
                + " or ".join(PROTOCOLS),
                param_hint="OTEL_EXPORTER_OTLP_PROTOCOL",
            )
    return settings
