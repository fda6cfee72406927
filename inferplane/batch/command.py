"""`inferplane batch`: score a table with a model, resumably, on this machine or a Ray cluster."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from inferplane.observability.trace_options import OtlpEndpointOpt, TraceSampleOpt, trace_settings

_out = Console()
_err = Console(stderr=True)


def batch_command(
    input: Annotated[
        str,
        typer.Option(
            "--input",
            "-i",
            help="Table to score: a file or folder (Parquet, CSV, JSON Lines), "
            "local or any fsspec URL (s3://lake/customers/).",
        ),
    ],
    output: Annotated[
        str,
        typer.Option(
            "--output",
            "-o",
            help="Folder for the scores (one Parquet file per input file), local or fsspec URL.",
        ),
    ],
    service: Annotated[
        str, typer.Option("--service", "-s", help="Service or model name that scores the rows.")
    ],
    repository: Annotated[
        str | None,
        typer.Option(
            "--repository",
            "-r",
            envvar="INFERPLANE_REPOSITORY",
            help="In-process: load the model from this repository (folder or fsspec URL).",
        ),
    ] = None,
    server: Annotated[
        str | None,
        typer.Option(help="Remote: an inferplane (or V2) server, e.g. http://host:8080."),
    ] = None,
    version: Annotated[
        str | None, typer.Option(help="Model version or alias; default: what the service routes.")
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", help="In-process: models to load (default: the target)."),
    ] = None,
    services: Annotated[
        str | None, typer.Option(help="In-process: traffic policy file (services.yaml).")
    ] = None,
    audit_sink: Annotated[
        str | None, typer.Option(help="In-process: audit every prediction to this sink.")
    ] = None,
    id_column: Annotated[
        list[str] | None,
        typer.Option("--id-column", help="Column copied to the output as it is (repeatable)."),
    ] = None,
    map_: Annotated[
        list[str] | None,
        typer.Option(
            "--map",
            help="Build a model input from columns: input=col1,col2,... or input=f* (repeatable).",
        ),
    ] = None,
    format: Annotated[
        str | None,
        typer.Option("--format", help="parquet, csv or json; default: from the file names."),
    ] = None,
    batch_size: Annotated[
        int,
        typer.Option(help="Rows per prediction request (capped by the model's max batch size)."),
    ] = 1024,
    chunk_rows: Annotated[
        int, typer.Option(help="Rows read, scored and written at a time per worker.")
    ] = 65536,
    concurrency: Annotated[int, typer.Option(help="Prediction requests in flight per worker.")] = 8,
    max_error_rate: Annotated[
        float,
        typer.Option(
            help="Largest fraction of bad rows per input file (0.01 = 1%); above it the job "
            "stops with exit code 1."
        ),
    ] = 0.01,
    job_id: Annotated[
        str | None,
        typer.Option(help="Job id written with every row; default: generated, kept on resume."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Delete the output folder and start over.")
    ] = False,
    shards: Annotated[
        int,
        typer.Option(
            help="Split the job's input files into this many shares, each scored by its own "
            "process into the same --output (a Kubernetes Indexed Job: its completions); "
            "needs --job-id."
        ),
    ] = 1,
    shard_index: Annotated[
        int | None,
        typer.Option(
            envvar="JOB_COMPLETION_INDEX",
            help="With --shards: the share this process scores, 0 to --shards minus 1 "
            "(an Indexed Job sets JOB_COMPLETION_INDEX in each pod).",
        ),
    ] = None,
    engine: Annotated[str, typer.Option(help="local (process pool) or ray (Ray Data).")] = "local",
    workers: Annotated[
        int | None, typer.Option(help="Local engine: worker processes (default: one per core).")
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(help="Ray engine: cluster address for ray.init (default: a local Ray)."),
    ] = None,
    ray_actors: Annotated[
        int | None, typer.Option(help="Ray engine: actors (default: one per CPU of the cluster).")
    ] = None,
    ray_cpus_per_actor: Annotated[
        float, typer.Option(help="Ray engine: CPUs each actor reserves.")
    ] = 0.5,
    log_interval: Annotated[
        float, typer.Option(help="Seconds between progress lines when not on a terminal.")
    ] = 10.0,
    otlp_endpoint: OtlpEndpointOpt = None,
    trace_sample: TraceSampleOpt = None,
    metrics_port: Annotated[
        int,
        typer.Option(
            help="Serve the job's Prometheus metrics (rows, files, start time) on this port "
            "while it runs; 0: off.",
            min=0,
            max=65535,
        ),
    ] = 0,
    metrics_host: Annotated[str, typer.Option(help="Address for the metrics port.")] = "127.0.0.1",
) -> None:
    """Score a table with a model. Exit codes: 0 done, 1 job failed (e.g. too many bad rows),
    2 usage or configuration error, 3 model or storage unavailable (retry later)."""
    from inferplane.batch.job import JobOptions, run_job
    from inferplane.batch.spec import EXIT_USAGE, JobFailed
    from inferplane.errors import InferplaneError

    options = JobOptions(
        input=input,
        output=output,
        target=service,
        repository=repository,
        server=server,
        version=version,
        models=list(model or []),
        services=services,
        audit_sink=audit_sink,
        id_columns=list(id_column or []),
        maps=list(map_ or []),
        input_format=format,
        batch_size=batch_size,
        chunk_rows=chunk_rows,
        concurrency=concurrency,
        max_error_rate=max_error_rate,
        job_id=job_id,
        overwrite=overwrite,
        shards=shards,
        shard_index=shard_index,
        engine=engine,
        workers=workers,
        ray_address=ray_address,
        ray_actors=ray_actors,
        ray_cpus_per_actor=ray_cpus_per_actor,
        progress_interval_s=log_interval,
        # A job is one unit of work: traced whole unless --trace-sample says otherwise.
        traces=trace_settings(
            otlp_endpoint, 1.0 if trace_sample is None else trace_sample, "inferplane-batch"
        ),
    )
    metrics = None
    if metrics_port:
        from inferplane.batch.progress import BatchMetrics

        metrics = BatchMetrics(job=job_id, target=service, engine=engine)
        try:
            metrics.serve(metrics_port, metrics_host)
        except OSError as exc:
            _err.print(
                f"[red]error:[/red] cannot serve metrics on {escape(metrics_host)}:"
                f"{metrics_port}: {escape(str(exc))}",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(EXIT_USAGE) from None

    def log(line: str) -> None:
        if metrics is not None:
            metrics.log_line(line)
        _err.print(line, highlight=False, soft_wrap=True)

    try:
        with metrics.watch() if metrics is not None else nullcontext():
            result = run_job(options, log=log)
    except InferplaneError as exc:
        # Printed here rather than by the CLI's generic handler: the message is escaped (an
        # install hint such as 'inferplane[batch]' is not rich markup) and JobFailed keeps its
        # own exit code (1 or 3); every other error is a usage error (2).
        _err.print(f"[red]error:[/red] {escape(exc.message)}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code if isinstance(exc, JobFailed) else EXIT_USAGE) from None
    except KeyboardInterrupt:
        _err.print(
            "[red]error:[/red] interrupted; committed files are kept, run the same command to "
            "resume",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(130) from None
    finally:
        if metrics is not None:
            metrics.close()
    if result.waiting is not None:
        rate = result.rows_this_run / result.elapsed_s if result.elapsed_s else 0.0
        for line in (
            f"job {result.job_id}: {result.waiting}",
            f"this run: {result.scored_fragments} files scored, {result.skipped_fragments} "
            f"already committed; {result.rows_this_run:,} rows in {result.elapsed_s:.1f}s "
            f"({rate:,.0f} rows/s)",
        ):
            _out.print(line, highlight=False, soft_wrap=True)
        return
    manifest = result.manifest
    rows = manifest.get("rows", {})
    if result.already_complete:
        _out.print(
            f"job {result.job_id}: already complete in {output} "
            f"({rows.get('out', 0):,} rows scored); nothing to do",
            highlight=False,
            soft_wrap=True,
        )
        return
    rate = result.rows_this_run / result.elapsed_s if result.elapsed_s else 0.0
    errored = int(rows.get("errored", 0))
    share = 100 * errored / rows["in"] if rows.get("in") else 0.0
    versions = ", ".join(
        f"{v or '?'} ({n:,} rows)" for v, n in manifest.get("model", {}).get("versions", {}).items()
    )
    others = len(manifest.get("fragments", [])) - result.scored_fragments
    others -= result.skipped_fragments
    lines = [
        f"job {result.job_id}: succeeded in {result.elapsed_s:.1f}s; "
        f"{result.scored_fragments} files scored, {result.skipped_fragments} already committed"
        + (
            f"; {result.shard.label} finished last ({others} files by the other shards) and "
            "wrote the manifest"
            if result.shard.parallel
            else ""
        ),
        f"rows: {rows.get('in', 0):,} in, {rows.get('out', 0):,} out, {errored:,} errored "
        f"({share:.2f}%); {rate:,.0f} rows/s this run",
        f"model: {manifest.get('model', {}).get('name')} version {versions or '-'}",
        f"output: {output} (manifest _manifest.json"
        + (", bad rows under _errors/)" if errored else ")"),
    ]
    for line in lines:
        _out.print(line, highlight=False, soft_wrap=True)
    sys.stdout.flush()
