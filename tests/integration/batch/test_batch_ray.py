"""The Ray engine (Ray Data, actor pool) against the local engine: identical output.

One module, one local Ray (2 CPUs, no dashboard) for every test in it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from inferplane.batch.job import JobOptions, run_job
from inferplane.batch.spec import JobFailed
from tests.integration.batch.conftest import assert_scores, read_scores, write_parquet_files


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    try:
        import ray
        import ray.data
    except ImportError as exc:
        pytest.fail(f"the Ray tests need ray[data]: pip install 'inferplane[ray]' ({exc})")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _options(repo: Path, src: Path, out: Path, **kw: object) -> JobOptions:
    return JobOptions(input=str(src), output=str(out), target="tabular", repository=str(repo),
                      id_columns=["customer_id"], job_id="same-job", **kw)  # type: ignore[arg-type]  # fmt: skip


def test_ray_and_local_engines_write_the_same_output(
    ray_local: None, repo: Path, tmp_path: Path
) -> None:
    x = write_parquet_files(tmp_path / "in", files=3, rows=2000)
    ray_result = run_job(_options(repo, tmp_path / "in", tmp_path / "ray", engine="ray"))
    local_result = run_job(_options(repo, tmp_path / "in", tmp_path / "local", workers=1))
    assert ray_result.manifest["engine"] == "ray"
    assert ray_result.manifest["rows"] == local_result.manifest["rows"] == {
        "in": 6000, "out": 6000, "errored": 0,
    }  # fmt: skip
    for name in ("part-000.parquet", "part-001.parquet", "part-002.parquet"):
        a = pq.read_table(tmp_path / "ray" / name).drop_columns(["scored_at"])
        b = pq.read_table(tmp_path / "local" / name).drop_columns(["scored_at"])
        assert a.schema == b.schema
        # Floats agree to rounding, not bit for bit: ONNX Runtime's result for a row can move
        # in the last bits with the batch it ran in and the intra-op threads it split over,
        # and the two engines form their batches differently. Everything else is exact.
        floats = [f.name for f in a.schema if pa.types.is_fixed_size_list(f.type)
                  or pa.types.is_floating(f.type)]  # fmt: skip
        assert a.drop_columns(floats).equals(b.drop_columns(floats)), name
        for col in floats:
            got = np.asarray(a.column(col).to_pylist(), dtype=np.float64)
            want = np.asarray(b.column(col).to_pylist(), dtype=np.float64)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"{name} {col}")
    assert_scores(read_scores(tmp_path / "ray"), repo, x, range(6000))
    for a, b in zip(
        ray_result.manifest["fragments"], local_result.manifest["fragments"], strict=True
    ):
        for key in ("input", "output", "rows_in", "rows_out", "rows_errored", "model_versions"):
            assert a[key] == b[key]


def test_an_actor_failure_stops_the_job_with_its_message(
    ray_local: None, repo: Path, tmp_path: Path
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "rows.csv").write_text("customer_id,input\n1,x\n")
    with pytest.raises(
        JobFailed, match=r"input 'rows.csv': 1 of 1 rows \(100.00%\) could not be scored"
    ):
        run_job(
            _options(
                repo,
                src,
                tmp_path / "out",
                engine="ray",
                maps=["input=" + ",".join(["input"] * 32)],
            )
        )
    assert not (tmp_path / "out" / "_SUCCESS").exists()
