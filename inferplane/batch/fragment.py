"""Score one input fragment end to end: read, map, predict, write, commit.

`FragmentScorer` holds one predictor (the model is loaded once) and an event loop, so that a
process-pool worker and a Ray actor run fragments the same way and write the same bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from inferplane.batch.extras import require_pyarrow
from inferplane.batch.mapping import map_chunk, needed_columns
from inferplane.batch.readers import Fragment, InputTable
from inferplane.batch.scoring import score_rows
from inferplane.batch.spec import METADATA_COLUMNS, JobFailed, JobSpec, TransientFailure
from inferplane.batch.writer import ERRORS, OutputLayout, ParquetOutput, output_key
from inferplane.errors import InferplaneError
from inferplane.observability import tracing
from inferplane.predictor import Predictor, open_predictor
from inferplane.tensors import BYTES, DATATYPE_TO_DTYPE, TensorSpec

Report = Callable[[int], None]  # rows just finished


class ErrorRateExceeded(JobFailed):
    pass


def arrow_type(spec: TensorSpec) -> Any:
    pa = require_pyarrow()
    base = (
        pa.binary()
        if spec.datatype == BYTES
        else pa.from_numpy_dtype(DATATYPE_TO_DTYPE[spec.datatype])
    )
    trailing = spec.shape[1:]
    if not trailing:
        return base
    if all(d > 0 for d in trailing):
        return pa.list_(base, int(np.prod(trailing)))
    return pa.list_(base)


def output_schema(job: JobSpec, input_schema: Any) -> Any:
    pa = require_pyarrow()
    fields = [input_schema.field(c) for c in job.id_columns]
    fields += [pa.field(o.name, arrow_type(o)) for o in job.outputs]
    fields += [
        pa.field("model_name", pa.string()),
        pa.field("model_version", pa.string()),
        pa.field("job_id", pa.string()),
        pa.field("scored_at", pa.timestamp("us", tz="UTC")),
    ]
    return pa.schema(fields)


def errors_schema(job: JobSpec, input_schema: Any) -> Any:
    pa = require_pyarrow()
    fields = [input_schema.field(c) for c in job.id_columns]
    fields += [
        pa.field("row", pa.int64()),
        pa.field("error", pa.string()),
        pa.field("input", pa.string()),
        pa.field("job_id", pa.string()),
    ]
    return pa.schema(fields)


def _column(values: np.ndarray, t: Any) -> Any:
    pa = require_pyarrow()
    if values.ndim == 1:
        return pa.array(values, type=t)
    flat = pa.array(values.reshape(-1), type=t.value_type)
    width = int(np.prod(values.shape[1:]))
    if pa.types.is_fixed_size_list(t):
        return pa.FixedSizeListArray.from_arrays(flat, width)
    offsets = pa.array(np.arange(0, values.shape[0] * width + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, flat)


class FragmentScorer:
    """One predictor, opened once, scoring fragment after fragment."""

    def __init__(self, job: JobSpec, table: InputTable) -> None:
        self.job = job
        self.table = table
        # A worker process exports its own fragments' spans; inline, the job's process does.
        self._own_tracing = job.traces is not None and tracing.ACTIVE is None
        if self._own_tracing:
            tracing.configure(job.traces)
        self.layout = OutputLayout(job.output_url, job.output_tmp)
        self.loop = asyncio.new_event_loop()
        self._stack = contextlib.AsyncExitStack()
        self.predictor: Predictor = self.loop.run_until_complete(
            self._stack.enter_async_context(
                open_predictor(
                    repository=job.repository,
                    server=job.server,
                    models=job.models,
                    services=job.services,
                    audit_sink=job.audit_sink,
                )
            )
        )

    def score(self, fragment: Fragment, report: Report = lambda _: None) -> dict[str, Any]:
        tracer = tracing.ACTIVE
        if tracer is None or self.job.trace_parent is None:
            return self._score_now(fragment, report)
        span = tracer.start_request(
            f"fragment {fragment.key}",
            self.job.trace_parent,
            {
                "inferplane.batch.job_id": self.job.job_id,
                "inferplane.batch.input": fragment.key,
                "inferplane.batch.input_bytes": fragment.size or 0,
            },
            kind=tracer.INTERNAL,
        )
        if span is None:
            return self._score_now(fragment, report)
        try:
            entry = self._score_now(fragment, report)
        except BaseException as exc:
            tracing.fail(span, str(exc))
            span.end()
            raise
        for key in ("rows_in", "rows_out", "rows_errored", "output_bytes"):
            span.set_attribute(f"inferplane.batch.{key}", int(entry.get(key) or 0))
        span.end()
        return entry

    def _score_now(self, fragment: Fragment, report: Report) -> dict[str, Any]:
        pa = require_pyarrow()
        try:
            return self.loop.run_until_complete(self._score(fragment, report))
        except InferplaneError:
            raise
        except OSError as exc:
            raise TransientFailure(f"input '{fragment.key}': storage error: {exc}") from exc
        except (pa.ArrowException, ValueError, TypeError) as exc:
            # e.g. a corrupt file, or an id column whose type differs from the first file's
            raise JobFailed(f"input '{fragment.key}' cannot be read or scored: {exc}") from exc

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self._stack.aclose())
        finally:
            self.loop.close()
            if self._own_tracing:
                tracing.shutdown()  # the worker's last spans go out before it exits

    async def _score(self, fragment: Fragment, report: Report) -> dict[str, Any]:
        pa = require_pyarrow()
        job = self.job
        started = time.monotonic()
        started_at = _now()
        feature_columns = needed_columns(job.bindings)
        columns = list(dict.fromkeys([*job.id_columns, *feature_columns]))
        out_schema = output_schema(job, self.table.schema)
        err_schema = errors_schema(job, self.table.schema)
        final = output_key(fragment.key)
        repetitive = [*METADATA_COLUMNS] + [
            o.name for o in job.outputs if o.datatype.startswith(("INT", "UINT", "BOOL", "BYTES"))
        ]
        output = ParquetOutput(self.layout, final, out_schema, repetitive)
        errors_out: ParquetOutput | None = None
        rows_in = rows_errored = 0
        versions: Counter[str] = Counter()
        reasons: list[str] = []
        try:
            for chunk_no, chunk in enumerate(
                self.table.read(fragment, columns, job.chunk_rows, feature_columns)
            ):
                mapped = map_chunk(job.bindings, chunk)
                scored = await score_rows(
                    self.predictor,
                    job,
                    mapped.inputs,
                    len(mapped.rows),
                    f"{job.job_id}/{fragment.key}#{chunk_no}",
                )
                errors = dict(mapped.errors)
                for pos, reason in scored.errors.items():
                    errors[int(mapped.rows[pos])] = reason
                keep = np.ones(len(mapped.rows), dtype=bool)
                if scored.errors:
                    keep[list(scored.errors)] = False
                positions = mapped.rows[keep]
                n_ok = len(positions)
                whole = n_ok == chunk.num_rows  # the common case: no copies of the columns
                if n_ok:
                    take = None if whole else pa.array(positions)
                    arrays = [
                        chunk.column(c) if take is None else chunk.column(c).take(take)
                        for c in job.id_columns
                    ]
                    for spec in job.outputs:
                        values = scored.outputs[spec.name]
                        values = values if n_ok == len(values) else values[keep]
                        arrays.append(_column(values, out_schema.field(spec.name).type))
                    if len(scored.answered) == 1:  # one version answered the whole chunk
                        name, version = next(iter(scored.answered))
                        names = pa.repeat(pa.scalar(name, pa.string()), n_ok)
                        vers = pa.repeat(pa.scalar(version, pa.string()), n_ok)
                        versions[version] += n_ok
                    else:
                        names = pa.array(scored.model_names[keep], type=pa.string())
                        vers = pa.array(scored.model_versions[keep], type=pa.string())
                        versions.update(vers.to_pylist())
                    scored_at = pa.scalar(_now_us(), out_schema.field("scored_at").type)
                    arrays += [
                        names,
                        vers,
                        pa.repeat(pa.scalar(job.job_id, pa.string()), n_ok),
                        pa.repeat(scored_at, n_ok),
                    ]
                    output.write(pa.Table.from_arrays(arrays, schema=out_schema))
                if errors:
                    if errors_out is None:
                        errors_out = ParquetOutput(self.layout, f"{ERRORS}/{final}", err_schema)
                    bad = np.array(sorted(errors), dtype=np.int64)
                    err_arrays = [chunk.column(c).take(pa.array(bad)) for c in job.id_columns]
                    err_arrays += [
                        pa.array(bad + rows_in, type=pa.int64()),
                        pa.array([errors[int(i)] for i in bad], type=pa.string()),
                        pa.array([fragment.key] * len(bad), type=pa.string()),
                        pa.array([job.job_id] * len(bad), type=pa.string()),
                    ]
                    errors_out.write(pa.Table.from_arrays(err_arrays, schema=err_schema))
                    for i in bad[: 3 - len(reasons)]:
                        reasons.append(f"row {int(i) + rows_in}: {errors[int(i)]}")
                rows_in += chunk.num_rows
                rows_errored += len(errors)
                report(chunk.num_rows)
                # Stop early once the whole fragment cannot end under the limit.
                if fragment.rows and rows_errored > job.max_error_rate * fragment.rows:
                    self._over_limit(fragment, rows_errored, fragment.rows, reasons, errors_out)
            if rows_in and rows_errored > job.max_error_rate * rows_in:
                self._over_limit(fragment, rows_errored, rows_in, reasons, errors_out)
            written = output.commit()
            errors_file = errors_out.commit() if errors_out is not None else None
            if errors_file is None:
                self.layout.remove(f"{ERRORS}/{final}")  # left by an earlier, failed run
        except BaseException:
            output.abort()
            if errors_out is not None:
                errors_out.abort()
            raise
        entry: dict[str, Any] = {
            "input": fragment.key,
            "input_bytes": fragment.size,
            "output": written.path,
            "output_bytes": written.bytes,
            "sha256": written.sha256,
            "rows_in": rows_in,
            "rows_out": written.rows,
            "rows_errored": rows_errored,
            "errors_file": errors_file.path if errors_file else None,
            "errors_sha256": errors_file.sha256 if errors_file else None,
            "model_versions": dict(sorted(versions.items())),
            "started_at": started_at,
            "committed_at": _now(),
            "duration_s": round(time.monotonic() - started, 3),
        }
        self.layout.commit_entry(entry)
        return entry

    def _over_limit(
        self,
        fragment: Fragment,
        errored: int,
        rows: int,
        reasons: list[str],
        errors_out: ParquetOutput | None,
    ) -> None:
        where = ""
        if errors_out is not None:
            # Keep the reasons where the user can read them; the fragment stays uncommitted.
            errors_out.commit()
            where = f"; all reasons in {self.layout.path(errors_out.final)}"
        raise ErrorRateExceeded(
            f"input '{fragment.key}': {errored} of {rows} rows "
            f"({100 * errored / rows:.2f}%) could not be scored, above --max-error-rate "
            f"{100 * self.job.max_error_rate:g}%; first: {'; '.join(reasons)}{where}"
        )


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def _now_us() -> int:
    return time.time_ns() // 1000
