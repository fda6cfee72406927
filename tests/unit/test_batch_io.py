"""Batch readers (Parquet with hive partitions, CSV, JSON Lines, fsspec URLs) and the writer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from inferplane.batch.readers import hive_values, open_input
from inferplane.batch.writer import SUCCESS, OutputLayout, ParquetOutput, output_key
from inferplane.errors import BadRequest, NotFound


def _read_all(url: str, columns: list[str], text: tuple[str, ...] = ()) -> pa.Table:
    table = open_input(url)
    parts = [
        chunk for fragment in table.fragments for chunk in table.read(fragment, columns, 1000, text)
    ]
    return pa.concat_tables(parts)


def test_parquet_with_hive_partitions_streams_in_order(tmp_path: Path) -> None:
    for day in ("2026-11-27", "2026-11-28"):
        folder = tmp_path / f"day={day}" / "region=eu"
        folder.mkdir(parents=True)
        ids = np.arange(2500) + (0 if day.endswith("27") else 10_000)
        pq.write_table(
            pa.table({"id": ids, "x": ids * 0.5}), folder / "a.parquet", row_group_size=700
        )
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / ".hidden.parquet").write_text("not parquet")
    table = open_input(str(tmp_path))
    assert table.format == "parquet"
    assert [f.key for f in table.fragments] == [
        "day=2026-11-27/region=eu/a.parquet",
        "day=2026-11-28/region=eu/a.parquet",
    ]
    assert [f.rows for f in table.fragments] == [2500, 2500] and table.total_rows == 5000
    assert set(table.schema.names) == {"id", "x", "day", "region"}
    chunks = list(table.read(table.fragments[1], ["id", "day", "region"], 1000))
    assert all(c.num_rows <= 1400 for c in chunks)  # about batch_rows, never the whole file
    got = pa.concat_tables(chunks)
    assert got["id"].to_pylist() == list(range(10_000, 12_500))
    assert set(got["day"].to_pylist()) == {"2026-11-28"} and set(got["region"].to_pylist()) == {
        "eu"
    }


def test_csv_feature_columns_are_read_as_text_so_bad_cells_stay_row_level(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("id,a\n1,0.5\n2,oops\n3,\n")
    got = _read_all(str(tmp_path), ["id", "a"], text=("a",))
    assert got["a"].to_pylist() == ["0.5", "oops", None]
    assert got["id"].to_pylist() == [1, 2, 3]


def test_json_lines(tmp_path: Path) -> None:
    lines = [json.dumps({"id": i, "v": [i, i + 1]}) for i in range(5)]
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    got = _read_all(str(tmp_path / "t.jsonl"), ["id", "v"])
    assert got["id"].to_pylist() == list(range(5)) and got["v"].to_pylist()[4] == [4, 5]


def test_any_fsspec_url(tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    with fs.open("/lake/t/part.parquet", "wb") as fh:
        pq.write_table(pa.table({"id": [1, 2, 3]}), fh)
    got = _read_all("memory://lake/t", ["id"])
    assert got["id"].to_pylist() == [1, 2, 3]
    fs.rm("/lake", recursive=True)


def test_input_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        open_input(str(tmp_path / "nope"))
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(BadRequest, match="has no Parquet, CSV or JSON Lines files"):
        open_input(str(tmp_path))
    (tmp_path / "a.csv").write_text("a\n1\n")
    (tmp_path / "b.jsonl").write_text('{"a": 1}\n')
    with pytest.raises(BadRequest, match="mixes formats \\(csv, json\\)"):
        open_input(str(tmp_path))
    assert [f.key for f in open_input(str(tmp_path), "csv").fragments] == ["a.csv"]
    with pytest.raises(BadRequest, match="unknown input format 'xls'"):
        open_input(str(tmp_path), "xls")


def test_hive_values() -> None:
    assert hive_values("a=1/b=x%20y/c/f.parquet") == {"a": "1", "b": "x y"}
    assert hive_values("a=__HIVE_DEFAULT_PARTITION__/f.parquet") == {"a": None}


def test_output_names_are_deterministic() -> None:
    assert output_key("day=1/part-0.csv.gz") == "day=1/part-0.parquet"
    assert output_key("x.jsonl") == "x.parquet"
    assert output_key("x.parquet") == "x.parquet"


def test_writer_commits_by_moving_a_hashed_temporary_file(tmp_path: Path) -> None:
    layout = OutputLayout(str(tmp_path / "out"))
    layout.prepare()
    schema = pa.schema([("id", pa.int64())])
    out = ParquetOutput(layout, "day=1/part.parquet", schema)
    out.write(pa.table({"id": [1, 2]}, schema=schema))
    out.write(pa.table({"id": [3]}, schema=schema))
    final = tmp_path / "out" / "day=1" / "part.parquet"
    assert not final.exists()  # nothing under the final name before the commit
    written = out.commit()
    assert final.exists() and written.rows == 3 and written.bytes == final.stat().st_size
    assert written.sha256 == hashlib.sha256(final.read_bytes()).hexdigest()
    assert pq.read_table(final)["id"].to_pylist() == [1, 2, 3]
    assert not list((tmp_path / "out" / "_tmp").rglob("*.parquet"))

    aborted = ParquetOutput(layout, "other.parquet", schema)
    aborted.write(pa.table({"id": [9]}, schema=schema))
    aborted.abort()
    assert not (tmp_path / "out" / "other.parquet").exists()

    layout.commit_entry({"input": "day=1/part.csv", "rows_out": 3})
    assert layout.entries() == {"day=1/part.csv": {"input": "day=1/part.csv", "rows_out": 3}}

    leftover = ParquetOutput(layout, "crashed.parquet", schema)  # a run that died mid-write
    leftover.write(pa.table({"id": [1]}, schema=schema))
    layout.prepare()
    assert not (tmp_path / "out" / "_tmp").exists()

    layout.finish({"job_id": "j"})
    assert (tmp_path / "out" / SUCCESS).exists()
    assert layout.read_json("_manifest.json") == {"job_id": "j"}
