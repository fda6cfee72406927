"""What a batch job is, in plain picklable values that engines ship to their workers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from inferplane.batch.mapping import InputBinding
from inferplane.batch.writer import TMP
from inferplane.errors import BadRequest, InferplaneError
from inferplane.tensors import TensorSpec

# Exit codes a scheduler can act on (docs/batch.md).
EXIT_OK = 0
EXIT_FAILED = 1  # the job ran and failed: bad rows above --max-error-rate, a model error
EXIT_USAGE = 2  # the command or its configuration is wrong: fix it before retrying
EXIT_RETRY = 3  # the model or storage was unavailable: retrying later may succeed

METADATA_COLUMNS = ("model_name", "model_version", "job_id", "scored_at")


class JobFailed(InferplaneError):
    """The job stopped; committed fragments stay, so a rerun resumes after the fix."""

    exit_code = EXIT_FAILED


class TransientFailure(JobFailed):
    exit_code = EXIT_RETRY


def error_to_wire(exc: InferplaneError) -> tuple[int, str]:
    """An error raised in a worker process or Ray actor, as plain values for the job."""
    return int(getattr(exc, "exit_code", EXIT_USAGE)), exc.message


def error_from_wire(code: int, message: str) -> InferplaneError:
    if code == EXIT_USAGE:
        return BadRequest(message)
    if code == EXIT_RETRY:
        return TransientFailure(message)
    return JobFailed(message)


@dataclass(slots=True)
class JobSpec:
    job_id: str
    input_url: str
    output_url: str
    target: str
    version: str | None
    repository: str | None
    server: str | None
    models: list[str]
    services: str | None
    audit_sink: str | None
    id_columns: list[str]
    bindings: list[InputBinding]
    outputs: list[TensorSpec]  # the prediction columns, in signature order
    batch_size: int  # rows per predictor request
    chunk_rows: int  # rows read, mapped and written at a time
    concurrency: int  # predictor requests in flight per worker
    max_error_rate: float
    retries: int = 5
    output_tmp: str = TMP  # the output's folder for files being written (its own per shard)
    extra: dict[str, str] = field(default_factory=dict)
    # Traces (observability/tracing.py): what workers export with, and the job's span that
    # each fragment's span goes under; None: not traced.
    traces: Any = None
    trace_parent: str | None = None

    @property
    def predictor_label(self) -> str:
        return f"remote {self.server}" if self.server else f"in-process {self.repository}"
