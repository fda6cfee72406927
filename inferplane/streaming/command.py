"""`inferplane stream`: score a broker stream with a model, in a consumer group, at least once."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from typing import TYPE_CHECKING, Annotated

import typer

from inferplane.errors import BadRequest
from inferplane.observability.trace_options import OtlpEndpointOpt, TraceSampleOpt, trace_settings

if TYPE_CHECKING:  # the command module stays light: the worker loads when a stream starts
    from inferplane.streaming.worker import WorkerSettings

log = logging.getLogger("inferplane.stream")


def stream_command(
    source: Annotated[
        str,
        typer.Option(
            help="Input stream: redis://host:port/db?stream=NAME or kafka://host:port/TOPIC."
        ),
    ],
    sink: Annotated[str, typer.Option(help="Output stream (same URL shapes).")],
    dlq: Annotated[
        str, typer.Option(help="Dead-letter stream: events that could not be scored, with why.")
    ],
    service: Annotated[str, typer.Option(help="Service or model name to score with.")],
    group: Annotated[
        str, typer.Option(help="Consumer group: workers in one group share the stream.")
    ] = "inferplane",
    consumer: Annotated[
        str | None,
        typer.Option(help="This worker's name in the group; default: <hostname>-<pid>."),
    ] = None,
    repository: Annotated[
        str | None,
        typer.Option(
            "--repository", "-r", help="Score in this process with models from this repository."
        ),
    ] = None,
    server: Annotated[
        str | None,
        typer.Option(help="Score through a V2 server instead, e.g. http://127.0.0.1:8080."),
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", help="In-process: load only this model (repeatable)."),
    ] = None,
    version: Annotated[
        str | None, typer.Option(help="Pin a model version or alias; default: routed.")
    ] = None,
    services: Annotated[
        str | None,
        typer.Option(
            help="In-process: traffic policy file; default: <repository>/services.yaml if any."
        ),
    ] = None,
    audit_sink: Annotated[
        str | None,
        typer.Option(help="In-process: audit every predictor call to this sink (docs/audit.md)."),
    ] = None,
    map_: Annotated[
        list[str] | None,
        typer.Option(
            "--map",
            help="Build an input from event fields: INPUT=FIELD or INPUT=F1,F2,... (repeatable).",
        ),
    ] = None,
    id_field: Annotated[
        str,
        typer.Option(
            help="Event field holding its id; an event without that field is named by its "
            "broker id (the Redis entry id, the Kafka offset)."
        ),
    ] = "id",
    time_field: Annotated[
        str | None,
        typer.Option(help="Event field holding its event time; default: the broker timestamp."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Most events per micro-batch.")] = 256,
    max_wait_ms: Annotated[
        float, typer.Option(help="Longest wait to fill a micro-batch after its first event.")
    ] = 10.0,
    max_in_flight: Annotated[
        int, typer.Option(help="Micro-batches read but not yet acknowledged (backpressure).")
    ] = 4,
    max_retries: Annotated[
        int, typer.Option(help="Retries of a transient failure before the dead-letter queue.")
    ] = 5,
    retry_backoff_ms: Annotated[
        float, typer.Option(help="First retry delay; doubles on each retry (with jitter).")
    ] = 100.0,
    timeout_ms: Annotated[float, typer.Option(help="Deadline of one predictor call.")] = 10_000.0,
    claim_idle_ms: Annotated[
        int, typer.Option(help="Redis: take over entries another consumer left pending this long.")
    ] = 30_000,
    start: Annotated[
        str, typer.Option(help="Where a new group starts: earliest or latest.")
    ] = "earliest",
    drain_timeout_s: Annotated[
        float, typer.Option(help="On SIGTERM, how long to finish and acknowledge held work.")
    ] = 30.0,
    metrics_port: Annotated[
        int, typer.Option(help="Serve Prometheus /metrics on this port; 0: off.")
    ] = 0,
    metrics_host: Annotated[str, typer.Option(help="Address for the metrics port.")] = "127.0.0.1",
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
    otlp_endpoint: OtlpEndpointOpt = None,
    trace_sample: TraceSampleOpt = None,
) -> None:
    """Score a stream: events in from --source, predictions out to --sink, failures to --dlq."""
    from inferplane.observability import tracing
    from inferplane.streaming.codec import parse_mapping

    for value, name in ((batch_size, "--batch-size"), (max_in_flight, "--max-in-flight")):
        if value < 1:
            raise typer.BadParameter("must be at least 1", param_hint=name)
    if max_retries < 0:
        raise typer.BadParameter("must be 0 or more", param_hint="--max-retries")
    if start not in ("earliest", "latest"):
        raise typer.BadParameter("use earliest or latest", param_hint="--start")
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from inferplane.streaming.worker import WorkerSettings

    # Each event continues the trace its producer sent (docs/observability.md "Traces").
    tracing.configure(trace_settings(otlp_endpoint, trace_sample, "inferplane-stream"))
    settings = WorkerSettings(
        target=service,
        version=version,
        batch_size=batch_size,
        max_wait_ms=max_wait_ms,
        max_in_flight=max_in_flight,
        max_retries=max_retries,
        retry_backoff_ms=retry_backoff_ms,
        timeout_ms=timeout_ms,
        drain_timeout_s=drain_timeout_s,
        id_field=id_field,
    )
    runner = _run(
        source=source,
        sink=sink,
        dlq=dlq,
        group=group,
        consumer=consumer or f"{socket.gethostname()}-{os.getpid()}",
        repository=repository,
        server=server,
        models=list(model or []),
        services=services,
        audit_sink=audit_sink,
        mapping=parse_mapping(map_ or []),
        time_field=time_field,
        claim_idle_ms=claim_idle_ms,
        start=start,
        settings=settings,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
    )
    try:
        import uvloop
    except ImportError:
        asyncio.run(runner)
    else:
        uvloop.run(runner)
    finally:
        tracing.shutdown()


async def _run(
    *,
    source: str,
    sink: str,
    dlq: str,
    group: str,
    consumer: str,
    repository: str | None,
    server: str | None,
    models: list[str],
    services: str | None,
    audit_sink: str | None,
    mapping: dict[str, list[str]],
    time_field: str | None,
    claim_idle_ms: int,
    start: str,
    settings: WorkerSettings,
    metrics_port: int,
    metrics_host: str,
) -> None:
    from inferplane.predictor import open_predictor
    from inferplane.streaming.codec import Decoder
    from inferplane.streaming.connector import SourceOptions, open_sink, open_source
    from inferplane.streaming.metrics import StreamMetrics
    from inferplane.streaming.worker import StreamWorker

    # Parse every URL before loading models: a typo should not cost a model load.
    src = open_source(source, SourceOptions(group, consumer, start, claim_idle_ms))
    out, dead = open_sink(sink), open_sink(dlq, "--dlq")
    if source in (sink, dlq):
        raise BadRequest("--source must differ from --sink and --dlq (outputs would be rescored)")
    if server is not None and (services or audit_sink):
        raise BadRequest(
            "--services and --audit-sink apply in-process; with --server, the server applies "
            "its own policy and audit"
        )
    async with open_predictor(
        repository=repository,
        server=server,
        models=models,
        services=services,
        audit_sink=audit_sink,
    ) as predictor:
        signature = await predictor.signature(settings.target, settings.version)
        decoder = Decoder(signature, mapping, id_field=settings.id_field, time_field=time_field)
        metrics = StreamMetrics()
        metrics.info.labels(src.name, group, consumer, settings.target).set(1)
        if metrics_port:
            metrics.serve(metrics_port, metrics_host)
        worker = StreamWorker(predictor, decoder, src, out, dead, settings, metrics)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        log.info(
            "stream: %s -> %s (dead letters: %s) with %s (model %s version %s), "
            "group %s as %s; predictor calls of up to %d rows",
            src.name, out.name, dead.name, settings.target, signature.model_name,
            signature.model_version or "routed", group, consumer, worker.max_rows,
        )  # fmt: skip
        await worker.run()
