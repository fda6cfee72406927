"""Mapped rows -> predictions, through any `Predictor`, in requests of `batch_size` rows.

Requests run `concurrency` at a time so the model's scheduler (or the remote server) always has
the next batch queued. A request the model rejects (BadRequest) is split in halves until the
offending rows are alone: they become bad rows, the rest is scored. Transient failures
(unavailable, overloaded, deadline) are retried with backoff, then stop the job.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from inferplane.batch.spec import JobFailed, JobSpec, TransientFailure
from inferplane.errors import BadRequest, DeadlineExceeded, InferplaneError, Unavailable
from inferplane.predictor import Prediction, Predictor, RequestContext


@dataclass(slots=True)
class Scored:
    outputs: dict[str, np.ndarray]
    model_names: np.ndarray  # object array, one per row
    model_versions: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)  # mapped-row position -> reason
    answered: set[tuple[str, str]] = field(default_factory=set)  # (model name, version) seen


async def score_rows(
    predictor: Predictor,
    job: JobSpec,
    inputs: dict[str, np.ndarray],
    n: int,
    request_prefix: str,
) -> Scored:
    scored = Scored({}, np.empty(n, dtype=object), np.empty(n, dtype=object))
    if n == 0:
        return scored
    starts = list(range(0, n, job.batch_size))
    next_index = 0

    async def lane() -> None:
        nonlocal next_index
        while next_index < len(starts):
            start = starts[next_index]
            next_index += 1
            await _score_range(
                predictor, job, inputs, scored, n, start, min(start + job.batch_size, n),
                request_prefix,
            )  # fmt: skip

    lanes = [asyncio.ensure_future(lane()) for _ in range(min(job.concurrency, len(starts)))]
    try:
        await asyncio.gather(*lanes)
    except BaseException:
        for task in lanes:
            task.cancel()
        raise
    return scored


async def _score_range(
    predictor: Predictor,
    job: JobSpec,
    inputs: dict[str, np.ndarray],
    scored: Scored,
    n: int,
    start: int,
    stop: int,
    prefix: str,
) -> None:
    part = {k: v[start:stop] for k, v in inputs.items()}
    try:
        prediction = await _predict(predictor, job, part, f"{prefix}:{start}")
    except BadRequest as exc:
        if stop - start == 1:
            scored.errors[start] = exc.message
            return
        middle = (start + stop) // 2
        await _score_range(predictor, job, inputs, scored, n, start, middle, prefix)
        await _score_range(predictor, job, inputs, scored, n, middle, stop, prefix)
        return
    for spec in job.outputs:
        value = prediction.outputs.get(spec.name)
        if value is None or value.shape[:1] != (stop - start,):
            raise JobFailed(
                f"model '{prediction.model_name}' version {prediction.model_version} answered "
                f"{stop - start} rows without output '{spec.name}' for each row"
            )
        target = scored.outputs.get(spec.name)
        if target is None:
            target = scored.outputs[spec.name] = np.zeros((n, *value.shape[1:]), value.dtype)
        target[start:stop] = value
    scored.model_names[start:stop] = prediction.model_name
    scored.model_versions[start:stop] = prediction.model_version
    scored.answered.add((prediction.model_name, prediction.model_version))


async def _predict(
    predictor: Predictor, job: JobSpec, inputs: dict[str, np.ndarray], request_id: str
) -> Prediction:
    delay = 0.2
    for attempt in range(job.retries + 1):
        try:
            return await predictor.predict(
                job.target,
                inputs,
                version=job.version,
                outputs=[o.name for o in job.outputs],
                context=RequestContext(request_id=request_id, pattern="batch"),
            )
        except (Unavailable, DeadlineExceeded) as exc:
            if attempt == job.retries:
                raise TransientFailure(
                    f"'{job.target}' still unavailable after {job.retries + 1} tries: {exc.message}"
                ) from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        except BadRequest:
            raise
        except InferplaneError as exc:
            raise JobFailed(f"'{job.target}' failed: {exc.message}") from exc
    raise AssertionError("unreachable")
