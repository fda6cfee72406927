"""Helpers for the batch tests: input tables, the `inferplane batch` subprocess, expected scores.

Every test scores the example `tabular` forest (input FP32 [-1, 32]) from the session's
`example_build` repository; `expected_scores` computes the same predictions with ONNX Runtime
directly, as the reference.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.integration.servers import ROOT

FEATURES = 32


def features(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, FEATURES), dtype=np.float32)


def vector_table(ids: np.ndarray, x: np.ndarray) -> pa.Table:
    values = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), FEATURES)
    return pa.table({"customer_id": ids, "input": values})


def write_parquet_files(folder: Path, files: int, rows: int, seed: int = 0) -> np.ndarray:
    """`files` Parquet files of `rows` rows (customer_id, input); returns all features by id."""
    folder.mkdir(parents=True, exist_ok=True)
    x = features(files * rows, seed)
    for f in range(files):
        ids = np.arange(f * rows, (f + 1) * rows, dtype=np.int64)
        table = vector_table(ids, x[f * rows : (f + 1) * rows])
        pq.write_table(table, folder / f"part-{f:03d}.parquet", row_group_size=max(1, rows // 3))
    return x


def run_batch(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inferplane", "batch", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )  # fmt: skip


def read_scores(folder: Path | str, filesystem: object = None) -> pa.Table:
    """Every committed output file under `folder` (not _errors/ or _tmp/), sorted by id."""
    import pyarrow.dataset as ds

    dataset = ds.dataset(str(folder), format="parquet", filesystem=filesystem,
                         partitioning="hive", ignore_prefixes=["_", "."])  # fmt: skip
    return dataset.to_table().sort_by("customer_id")


def expected_scores(repo: Path, x: np.ndarray, version: int = 1) -> tuple[np.ndarray, np.ndarray]:
    model = next((repo / "tabular" / str(version)).glob("*.onnx"))
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    label, probabilities = session.run(["label", "probabilities"], {"input": x})
    return label, probabilities


def assert_scores(table: pa.Table, repo: Path, x: np.ndarray, ids: Sequence[int]) -> None:
    assert table["customer_id"].to_pylist() == list(ids)
    label, probabilities = expected_scores(repo, x[np.asarray(ids)])
    np.testing.assert_array_equal(table["label"].to_numpy(), label)
    got = np.stack(table["probabilities"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, probabilities, atol=1e-5)
    assert set(table["model_name"].to_pylist()) == {"tabular"}
    assert set(table["model_version"].to_pylist()) == {"1"}


@pytest.fixture(scope="session")
def repo(example_build: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with only the example `tabular` model (both versions and its aliases).

    Only what these tests score: other models and the example traffic policy belong to other
    features, and a server or job over this copy starts faster.
    """
    copy = tmp_path_factory.mktemp("batch-repo") / "models"
    shutil.copytree(example_build[0] / "tabular", copy / "tabular")
    return copy
