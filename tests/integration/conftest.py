"""Fixtures that build the example repository and run a real server over it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.brokers import redis_server, tansu  # noqa: F401 - fixtures
from tests.integration.servers import ECHO_MODEL, ECHO_TYPES, ROOT, ServerProcess, start_server


@pytest.fixture(scope="session")
def example_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(repository, artifacts) built by examples/build_models.py, plus the datatype echo model."""
    base = tmp_path_factory.mktemp("examples")
    repo, artifacts = base / "models", base / "artifacts"
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "build_models.py"), "--out", str(repo),
         "--artifacts", str(artifacts)],
        check=True, cwd=ROOT, capture_output=True,
    )  # fmt: skip
    echo_dir = base / "echo"
    echo_dir.mkdir()
    (echo_dir / "model.py").write_text(ECHO_MODEL)
    from inferplane.repository.register import register
    from inferplane.repository.store import Repository
    from inferplane.tensors import TensorSpec

    register(
        Repository(str(repo)),
        "echo",
        str(echo_dir),
        inputs=[TensorSpec(n, t, [-1]) for n, t in ECHO_TYPES.items()],
        outputs=[TensorSpec(f"{n}_out", t, [-1]) for n, t in ECHO_TYPES.items()],
    )
    return repo, artifacts


@pytest.fixture(scope="session")
def server(
    example_build: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One real server over the example repository, shared by the REST tests.

    A 2 MiB payload limit so that the 413 case needs no huge body.
    """
    srv = start_server(example_build[0], tmp_path_factory.mktemp("logs"), "--max-payload-mb", "2")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def artifacts(example_build: tuple[Path, Path]) -> Path:
    return example_build[1]


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30.0) as c:
        yield c
