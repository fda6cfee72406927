"""`--shards N --shard-index I`: the partition of a job's fragments, the checks of the options,
and the output's temporary folders that shards sharing one output keep apart."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from inferplane.batch.readers import Fragment
from inferplane.batch.shards import Shard, check_shard, share, waiting_line
from inferplane.batch.writer import OutputLayout
from inferplane.errors import BadRequest

ROOT = Path(__file__).resolve().parents[2]


def fragments(n: int) -> list[Fragment]:
    return [Fragment(f"/in/day=1/part-{i:03d}.parquet", f"day=1/part-{i:03d}.parquet", 10, 5)
            for i in range(n)]  # fmt: skip


@pytest.mark.parametrize(("files", "count"), [(1, 1), (7, 1), (7, 3), (16, 4), (100, 7)])
def test_every_fragment_is_in_exactly_one_shard_and_shares_differ_by_at_most_one(
    files: int, count: int
) -> None:
    listing = fragments(files)
    shares = [share(listing, Shard(i, count)) for i in range(count)]
    keys = [f.key for s in shares for f in s]
    assert sorted(keys) == sorted(f.key for f in listing)
    assert len(keys) == len(set(keys))
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 1


def test_the_partition_is_stable_and_ignores_the_listing_order() -> None:
    listing = fragments(10)
    first = [share(listing, Shard(i, 3)) for i in range(3)]
    assert first == [share(listing, Shard(i, 3)) for i in range(3)]
    assert first == [share(list(reversed(listing)), Shard(i, 3)) for i in range(3)]
    assert [f.key for f in first[1]] == [
        f"day=1/part-{i:03d}.parquet" for i in (1, 4, 7)
    ]  # sorted position mod 3


def test_more_shards_than_fragments_leaves_the_extra_shards_empty() -> None:
    listing = fragments(2)
    shares = [share(listing, Shard(i, 5)) for i in range(5)]
    assert [len(s) for s in shares] == [1, 1, 0, 0, 0]
    assert share([], Shard(0, 3)) == []


def test_one_shard_is_the_whole_job() -> None:
    assert check_shard(1, None, job_id=None, overwrite=True) == Shard(0, 1)
    assert check_shard(1, 0, job_id=None, overwrite=False) == Shard(0, 1)
    assert not Shard().parallel and Shard().tmp == "_tmp"
    assert check_shard(4, 3, job_id="j", overwrite=False) == Shard(3, 4)
    assert Shard(3, 4).tmp == "_tmp/shard-3" and Shard(3, 4).label == "shard 3/4"


@pytest.mark.parametrize(
    ("count", "index", "job_id", "overwrite", "message"),
    [
        (0, None, "j", False, "--shards 0: must be at least 1"),
        (-2, 0, "j", False, "--shards -2: must be at least 1"),
        (3, None, "j", False, "--shards 3 needs --shard-index (0 to 2), or JOB_COMPLETION_INDEX"),
        (3, 3, "j", False, "--shard-index 3 is outside 0 to 2 for --shards 3"),
        (3, -1, "j", False, "--shard-index -1 is outside 0 to 2 for --shards 3"),
        (1, 1, None, False, "--shard-index 1 is outside 0 to 0 for --shards 1"),
        (3, 0, None, False, "--shards 3 needs --job-id: every shard must write the same job id"),
        (3, 0, "j", True, "--overwrite cannot go with --shards"),
    ],
)  # fmt: skip
def test_bad_shard_options_are_refused(
    count: int, index: int | None, job_id: str | None, overwrite: bool, message: str
) -> None:
    with pytest.raises(BadRequest) as caught:
        check_shard(count, index, job_id=job_id, overwrite=overwrite)
    assert caught.value.message.startswith(message)


def test_the_cli_takes_the_index_from_job_completion_index_and_exits_2_on_a_bad_one(
    tmp_path: Path,
) -> None:
    args = ["batch", "-i", str(tmp_path), "-o", str(tmp_path / "out"), "-s", "m",
            "-r", str(tmp_path), "--shards", "4", "--job-id", "j"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "inferplane", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=60, env={"PATH": "", "JOB_COMPLETION_INDEX": "4"},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert " ".join(done.stderr.split()).startswith(
        "error: --shard-index 4 is outside 0 to 3 for --shards 4 (in an Indexed Job it comes "
        "from JOB_COMPLETION_INDEX"
    )


def test_a_shard_prepares_and_cleans_only_its_own_temporary_folder(tmp_path: Path) -> None:
    one, other = (
        OutputLayout(str(tmp_path), "_tmp/shard-0"),
        OutputLayout(str(tmp_path), "_tmp/shard-1"),
    )
    being_written = tmp_path / "_tmp" / "shard-1" / "abc" / "part-000.parquet"
    being_written.parent.mkdir(parents=True)
    being_written.write_bytes(b"half")
    one.prepare()
    one.write_json("_job.json", {"job_id": "j"})
    assert being_written.exists()  # shard 0 starting does not delete shard 1's file
    one.drop_tmp()
    assert being_written.exists() and not (tmp_path / "_tmp" / "shard-0").exists()
    other.drop_tmp()  # the last one out removes the empty _tmp
    assert not (tmp_path / "_tmp").exists()
    assert (tmp_path / "_job.json").exists()


def test_the_waiting_line() -> None:
    assert waiting_line(Shard(1, 3), 2, 2, 4, 6) == (
        "shard 1/3: 2 of its 2 fragments committed; 4 of 6 for the whole job; the last shard to "
        "finish writes the manifest"
    )
