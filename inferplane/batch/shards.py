"""Parallel shards of one batch job: `--shards N --shard-index I`, e.g. a Kubernetes Indexed Job.

Every shard plans the whole job (the same listing, the same job id, the same output folder),
scores only its share of the input files and commits them as a single process does; the shard
that finds every file of the job committed when it finishes writes the manifest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from inferplane.batch.readers import Fragment
from inferplane.batch.writer import TMP
from inferplane.errors import BadRequest

INDEX_ENV = "JOB_COMPLETION_INDEX"  # what a Kubernetes Indexed Job sets in each pod


@dataclass(frozen=True, slots=True)
class Shard:
    index: int = 0
    count: int = 1

    @property
    def label(self) -> str:
        return f"shard {self.index}/{self.count}"

    @property
    def parallel(self) -> bool:
        return self.count > 1

    @property
    def tmp(self) -> str:
        """The output's folder for this shard's files being written (writer.py)."""
        return f"{TMP}/shard-{self.index}" if self.parallel else TMP


def check_shard(count: int, index: int | None, *, job_id: str | None, overwrite: bool) -> Shard:
    """The shard this process is, from --shards and --shard-index (BadRequest: exit code 2)."""
    if count < 1:
        raise BadRequest(f"--shards {count}: must be at least 1")
    if index is None:
        if count > 1:
            raise BadRequest(
                f"--shards {count} needs --shard-index (0 to {count - 1}), or {INDEX_ENV} as a "
                "Kubernetes Indexed Job sets it"
            )
        index = 0
    if not 0 <= index < count:
        raise BadRequest(
            f"--shard-index {index} is outside 0 to {count - 1} for --shards {count} (in an "
            f"Indexed Job it comes from {INDEX_ENV}: --shards must equal the Job's completions)"
        )
    if count > 1 and not job_id:
        raise BadRequest(
            f"--shards {count} needs --job-id: every shard must write the same job id "
            "(e.g. --job-id propensity-$DAY)"
        )
    if count > 1 and overwrite:
        raise BadRequest(
            "--overwrite cannot go with --shards: each shard would delete what the others "
            "committed; empty the output folder before the shards start"
        )
    return Shard(index, count)


def share(fragments: Sequence[Fragment], shard: Shard) -> list[Fragment]:
    """The fragments `shard` scores: position in key order, modulo the shard count.

    Positions rather than a hash of each key: shares then differ by at most one file, so the
    shards finish together (a hash spreads a few dozen files unevenly, often half as many again
    on one shard). Every shard that lists the same input computes the same partition, as the
    listing is sorted by key here. If the input changes while the shards run, a shard may miss a
    file; then no shard sees the job complete, `_SUCCESS` is not written and a rerun scores what
    is left.
    """
    ordered = sorted(fragments, key=lambda f: f.key)
    return [f for i, f in enumerate(ordered) if i % shard.count == shard.index]


def waiting_line(shard: Shard, own_done: int, own: int, job_done: int, job: int) -> str:
    """What a shard that is not the last to finish reports."""
    return (
        f"{shard.label}: {own_done} of its {own} fragments committed; {job_done} of {job} for "
        "the whole job; the last shard to finish writes the manifest"
    )
