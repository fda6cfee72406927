"""Fixtures of the streaming tests (the brokers, `redis_server` and `tansu`, live in
tests/integration/brokers.py); helpers (worker processes, waiting) live in harness.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tabular_repo(
    example_build: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A repository holding only the example `tabular` model (versions 1, 2 and its aliases).

    The streaming tests score one model; a copy keeps them independent of the rest of the
    example repository (other models, its traffic policy file).
    """
    repo = tmp_path_factory.mktemp("stream-models")
    shutil.copytree(example_build[0] / "tabular", repo / "tabular")
    return repo
