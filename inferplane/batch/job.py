"""A batch job: plan the fragments, skip the committed ones, score the rest, write the manifest.

Planning happens here, in the calling process: the input is listed, the target's signature
decides the mapping, and the output folder says what an earlier run of the same job committed.
An engine then scores the pending fragments (`local_engine`, `ray_engine`) and every committed
fragment's entry comes back here for progress and the final manifest.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from inferplane.batch.extras import require_pyarrow, require_ray
from inferplane.batch.mapping import bind_inputs, parse_maps
from inferplane.batch.progress import JobProgress
from inferplane.batch.readers import Fragment, InputTable, open_input
from inferplane.batch.shards import Shard, check_shard, share, waiting_line
from inferplane.batch.spec import METADATA_COLUMNS, JobSpec, TransientFailure
from inferplane.batch.stopping import JobStopped, stop_on_sigterm
from inferplane.batch.writer import JOB_FILE, SUCCESS, OutputLayout, output_key
from inferplane.errors import BadRequest, DeadlineExceeded, Unavailable
from inferplane.observability import tracing
from inferplane.observability.tracing import TraceSettings
from inferplane.predictor import Signature, open_predictor

ENGINES = ("local", "ray")


@dataclass(slots=True)
class JobOptions:
    input: str
    output: str
    target: str
    repository: str | None = None
    server: str | None = None
    version: str | None = None
    models: list[str] = field(default_factory=list)
    services: str | None = None
    audit_sink: str | None = None
    id_columns: list[str] = field(default_factory=list)
    maps: list[str] = field(default_factory=list)
    input_format: str | None = None
    batch_size: int = 1024
    chunk_rows: int = 65536
    concurrency: int = 8
    max_error_rate: float = 0.01
    job_id: str | None = None
    overwrite: bool = False
    shards: int = 1  # --shards: the job is split into this many shares of its input files
    shard_index: int | None = None  # --shard-index: the share this process scores
    engine: str = "local"
    workers: int | None = None
    ray_address: str | None = None
    ray_actors: int | None = None
    ray_cpus_per_actor: float = 0.5
    progress_interval_s: float = 10.0
    traces: TraceSettings | None = None  # OpenTelemetry export; None: not traced


@dataclass(slots=True)
class JobResult:
    job_id: str
    manifest: dict[str, Any]
    scored_fragments: int
    skipped_fragments: int
    already_complete: bool
    elapsed_s: float
    rows_this_run: int
    shard: Shard = field(default_factory=Shard)
    # A shard whose share is committed while others' are not: what it reports (no manifest).
    waiting: str | None = None


@dataclass(slots=True)
class Plan:
    job: JobSpec
    table: InputTable
    layout: OutputLayout
    signature: Signature
    pending: list[Fragment]  # of this shard's share (every fragment unless --shards)
    committed: dict[str, dict[str, Any]]  # every shard's
    identity: dict[str, Any]
    created_at: str
    shard: Shard
    share: list[Fragment]  # the fragments this shard scores, committed or not


def _check_options(o: JobOptions) -> None:
    if o.engine not in ENGINES:
        raise BadRequest(f"--engine '{o.engine}': use one of {', '.join(ENGINES)}")
    if not 0.0 <= o.max_error_rate <= 1.0:
        raise BadRequest("--max-error-rate is a fraction between 0 and 1, e.g. 0.01 for 1%")
    for name, value in (
        ("--batch-size", o.batch_size),
        ("--chunk-rows", o.chunk_rows),
        ("--concurrency", o.concurrency),
    ):
        if value < 1:
            raise BadRequest(f"{name} must be at least 1")
    if o.workers is not None and o.workers < 1:
        raise BadRequest("--workers must be at least 1")
    if o.ray_address and o.engine != "ray":
        raise BadRequest("--ray-address goes with --engine ray")
    if o.ray_cpus_per_actor <= 0:
        raise BadRequest("--ray-cpus-per-actor must be above 0")
    require_pyarrow()
    if o.engine == "ray":
        require_ray()  # before the model loads: a missing extra is a usage error


def _models_to_load(o: JobOptions) -> list[str]:
    """In-process, load only the target when it is a model; a service may need any model."""
    if o.models or o.server:
        return list(o.models)
    from inferplane.repository.store import Repository

    assert o.repository is not None
    return [o.target] if o.target in Repository(o.repository).list_models() else []


async def _signature(o: JobOptions, models: list[str]) -> Signature:
    async with open_predictor(
        repository=o.repository,
        server=o.server,
        models=models,
        services=o.services,
        audit_sink=None,
    ) as predictor:
        return await predictor.signature(o.target, o.version)


def plan_job(o: JobOptions) -> Plan:
    """Everything a run needs, checked before any row is scored (BadRequest: exit code 2)."""
    _check_options(o)
    shard = check_shard(o.shards, o.shard_index, job_id=o.job_id, overwrite=o.overwrite)
    table = open_input(o.input, o.input_format)
    models = _models_to_load(o)
    try:
        signature = asyncio.run(_signature(o, models))
    except (Unavailable, DeadlineExceeded) as exc:
        raise TransientFailure(exc.message) from exc
    bindings = bind_inputs(signature, table.schema, parse_maps(o.maps, table.schema.names))
    columns = table.schema.names
    missing = [c for c in o.id_columns if c not in columns]
    if missing:
        raise BadRequest(
            f"--id-column {', '.join(repr(m) for m in missing)}: no such column in the input; "
            f"columns are {', '.join(columns)}"
        )
    output_names = [t.name for t in signature.outputs]
    clashes = sorted(set(o.id_columns) & {*output_names, *METADATA_COLUMNS})
    if clashes:
        raise BadRequest(
            f"--id-column {', '.join(clashes)} would clash with an output column of the same name"
        )
    if len(set(o.id_columns)) != len(o.id_columns):
        raise BadRequest("--id-column names a column twice")
    keys: dict[str, str] = {}
    for fragment in table.fragments:
        out = output_key(fragment.key)
        if out in keys:
            raise BadRequest(
                f"inputs '{keys[out]}' and '{fragment.key}' would both be written to '{out}'; "
                "rename one of them"
            )
        keys[out] = fragment.key
    batch_size = o.batch_size
    if signature.max_batch_size > 0 and o.server is not None:
        # A server holds requests to its online limit; in-process, batch calls may exceed it.
        batch_size = min(batch_size, signature.max_batch_size)

    identity = {
        "input": o.input.rstrip("/"),
        "format": table.format,
        "target": o.target,
        "version": o.version,
        "id_columns": list(o.id_columns),
        "inputs": [asdict(b) for b in bindings],
        "outputs": output_names,
    }
    identity = json.loads(json.dumps(identity))  # as stored: tuples become lists
    layout = OutputLayout(o.output, shard.tmp)
    if o.overwrite:
        layout.clear()
    existing = layout.read_json(JOB_FILE)
    if existing is not None:
        job_id = str(existing["job_id"])
        if o.job_id and o.job_id != job_id:
            raise BadRequest(
                f"output '{o.output}' holds job '{job_id}', not '{o.job_id}'; use another "
                "--output, the same --job-id, or --overwrite"
            )
        differs = [k for k, v in identity.items() if existing.get("identity", {}).get(k) != v]
        if differs:
            raise BadRequest(
                f"output '{o.output}' holds job '{job_id}' with a different "
                f"{', '.join(differs)}; use another --output or --overwrite to start over"
            )
        created_at = str(existing.get("created_at", ""))
    else:
        job_id = o.job_id or (
            datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:8]
        )
        created_at = _now()
    committed = layout.entries()
    by_key = {f.key: f for f in table.fragments}
    for key, entry in committed.items():
        now = by_key.get(key)
        if now is not None and now.size and entry.get("input_bytes") != now.size:
            raise BadRequest(
                f"input '{key}' changed since job '{job_id}' scored it ({entry.get('input_bytes')}"
                f" -> {now.size} bytes); use another --output or --overwrite"
            )
    mine = share(table.fragments, shard)
    pending = [f for f in mine if f.key not in committed]
    job = JobSpec(
        job_id=job_id,
        input_url=o.input,
        output_url=o.output,
        target=o.target,
        version=o.version,
        repository=o.repository,
        server=o.server,
        models=models,
        services=o.services,
        audit_sink=o.audit_sink,
        # A hive partition column stays in the output's folder names, as it was in the input's:
        # written inside the files too, readers of the output folder would see it twice.
        id_columns=[c for c in o.id_columns if c not in table.partition_columns],
        bindings=bindings,
        outputs=list(signature.outputs),
        batch_size=batch_size,
        chunk_rows=o.chunk_rows,
        concurrency=o.concurrency,
        max_error_rate=o.max_error_rate,
        output_tmp=shard.tmp,
    )
    return Plan(
        job, table, layout, signature, pending, committed, identity, created_at, shard, mine
    )


def run_job(
    o: JobOptions,
    *,
    stream: TextIO | None = None,
    fancy_progress: bool | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> JobResult:
    """Plan and run the job; raises JobFailed (exit 1/3) or BadRequest and kin (exit 2)."""
    owned = o.traces is not None and tracing.ACTIVE is None
    if owned:
        tracing.configure(o.traces)
    try:
        return _traced_job(o, stream, fancy_progress, log)
    finally:
        if owned:
            tracing.shutdown()


def _traced_job(
    o: JobOptions,
    stream: TextIO | None,
    fancy_progress: bool | None,
    log: Callable[[str], None],
) -> JobResult:
    """The job under one span (`batch <target>`, continuing TRACEPARENT from the environment,
    the convention of schedulers that pass trace context to jobs); each fragment's span goes
    under it, from whichever process scores the fragment."""
    tracer = tracing.ACTIVE
    span = None
    if tracer is not None:
        span = tracer.start_request(
            f"batch {o.target}",
            os.environ.get("TRACEPARENT"),
            {"inferplane.batch.input": o.input, "inferplane.batch.output": o.output},
            kind=tracer.INTERNAL,
        )
    if span is None:
        return _run_job(o, stream, fancy_progress, log, None)
    try:
        result = _run_job(o, stream, fancy_progress, log, span)
    except BaseException as exc:
        tracing.fail(span, str(exc))
        span.end()
        raise
    span.set_attribute("inferplane.batch.job_id", result.job_id)
    span.set_attribute("inferplane.batch.fragments_scored", result.scored_fragments)
    span.set_attribute("inferplane.batch.rows", result.rows_this_run)
    span.end()
    return result


def _run_job(
    o: JobOptions,
    stream: TextIO | None,
    fancy_progress: bool | None,
    log: Callable[[str], None],
    span: Any,
) -> JobResult:
    started = time.monotonic()
    plan = plan_job(o)
    job, layout = plan.job, plan.layout
    if span is not None:
        job.traces, job.trace_parent = o.traces, tracing.traceparent_of(span)
    shard = plan.shard
    current = {f.key for f in plan.table.fragments}
    done = {k: v for k, v in plan.committed.items() if k in current}
    if len(done) == len(current) and layout.fs.exists(layout.path(SUCCESS)):
        manifest = layout.read_json("_manifest.json") or {}
        return JobResult(job.job_id, manifest, 0, len(done), True, 0.0, 0, shard=shard)
    layout.remove(SUCCESS)  # new or changed inputs: the old success no longer holds
    layout.prepare()
    layout.write_json(
        JOB_FILE, {"job_id": job.job_id, "created_at": plan.created_at, "identity": plan.identity}
    )
    if shard.parallel:
        todo = (
            f"{shard.label}: {len(plan.pending)} of its {len(plan.share)} input files to score "
            f"({len(plan.share) - len(plan.pending)} already committed; {len(done)} of "
            f"{len(current)} for the whole job)"
        )
    else:
        todo = (
            f"{len(plan.pending)} of {len(plan.table.fragments)} input files to score "
            f"({len(done)} already committed)"
        )
    log(
        f"job {job.job_id}: {todo}, target '{job.target}' "
        f"({plan.signature.model_name} {plan.signature.model_version or ''}) via "
        f"{job.predictor_label}, engine {o.engine}, {job.batch_size} rows per request"
    )
    pending_rows = [f.rows for f in plan.pending]
    total = None if any(r is None for r in pending_rows) else sum(r or 0 for r in pending_rows)
    progress = JobProgress(
        total,
        len(plan.pending),
        stream=stream,
        interval_s=o.progress_interval_s,
        fancy=fancy_progress,
        label=shard.label if shard.parallel else "",
    )

    def on_done(entry: dict[str, Any]) -> None:
        done[entry["input"]] = entry
        progress.fragment_done(entry)

    before = len(done)
    try:
        with stop_on_sigterm() as stopping:
            _run_engine(o, plan, progress, on_done, stopping)
    finally:
        progress.close()
    scored = len(done) - before
    if scored < len(plan.pending):  # only a stop returns early; failures raise
        raise JobStopped(
            f"stopped by SIGTERM at a fragment boundary: {scored} input files committed in "
            f"this run, {len(plan.pending) - scored} left; rerun "
            f"{shard.label if shard.parallel else 'the job'} to resume"
        )
    elapsed = time.monotonic() - started
    skipped = len(plan.share) - len(plan.pending)
    if shard.parallel:
        # Read again: the other shards committed theirs meanwhile. Every shard checks after its
        # last commit, so the last to commit sees all (two may: both write the same manifest).
        done = {k: v for k, v in layout.entries().items() if k in current}
        if len(done) < len(current):
            layout.drop_tmp()
            own = sum(f.key in done for f in plan.share)
            waiting = waiting_line(shard, own, len(plan.share), len(done), len(current))
            return JobResult(
                job.job_id, {}, scored, skipped, False, elapsed, progress.rows,
                shard=shard, waiting=waiting,
            )  # fmt: skip
        # Shards that planned at the same time each wrote _job.json: the one that stayed
        # says when the job was created.
        stored = layout.read_json(JOB_FILE) or {}
        plan.created_at = str(stored.get("created_at") or plan.created_at)
    manifest = build_manifest(plan, o, done, elapsed)
    layout.finish(manifest)
    return JobResult(
        job.job_id, manifest, scored, skipped, False, elapsed, progress.rows, shard=shard
    )


def _run_engine(
    o: JobOptions,
    plan: Plan,
    progress: JobProgress,
    on_done: Callable[[dict[str, Any]], None],
    stopping: threading.Event,
) -> None:
    if not plan.pending:
        return  # a shard whose share is committed, or empty (more shards than files)
    if o.engine == "ray":
        from inferplane.batch.ray_engine import run_ray

        run_ray(
            plan.job,
            plan.table,
            plan.pending,
            progress,
            on_done,
            address=o.ray_address,
            actors=o.ray_actors,
            cpus_per_actor=o.ray_cpus_per_actor,
            stopping=stopping,
        )
    else:
        from inferplane.batch.local_engine import run_local

        run_local(
            plan.job, plan.table, plan.pending, progress, on_done, workers=o.workers,
            stopping=stopping,
        )  # fmt: skip


def build_manifest(
    plan: Plan, o: JobOptions, done: dict[str, dict[str, Any]], elapsed: float
) -> dict[str, Any]:
    fragments = [done[f.key] for f in plan.table.fragments]
    versions: Counter[str] = Counter()
    for entry in fragments:
        versions.update(entry.get("model_versions", {}))
    rows = {k: sum(int(e[f"rows_{k}"]) for e in fragments) for k in ("in", "out", "errored")}
    return {
        "job_id": plan.job.job_id,
        "status": "succeeded",
        "input": o.input,
        "input_format": plan.table.format,
        "output": o.output,
        "target": plan.job.target,
        "version": plan.job.version,
        "predictor": plan.job.predictor_label,
        "engine": o.engine,
        "model": {"name": plan.signature.model_name, "versions": dict(sorted(versions.items()))},
        "id_columns": plan.identity["id_columns"],
        "partition_columns": sorted(plan.table.partition_columns),
        "inputs": plan.identity["inputs"],
        "outputs": plan.identity["outputs"],
        "max_error_rate": plan.job.max_error_rate,
        "rows": rows,
        "fragments": fragments,
        "created_at": plan.created_at,
        "finished_at": _now(),
        "last_run_duration_s": round(elapsed, 3),
    }


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
