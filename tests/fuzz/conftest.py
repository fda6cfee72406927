"""Hypothesis profiles for the property and fuzz tests, and the real server they attack.

Profiles (pick one with HYPOTHESIS_PROFILE):
- `ci` (the default, what `make test` runs): 50 examples per test (FUZZ_CI_EXAMPLES),
  derandomized so that every run tries the same inputs (a failure in CI reproduces on a laptop),
  a generous deadline instead of none so that a decoder that suddenly takes seconds still fails.
  The whole directory took 15 s on two cores (100 examples: 27 s), within the minute it may use.
- `fuzz` (`make fuzz`): thousands of examples each (FUZZ_EXAMPLES, default 5000), random seeds,
  no deadline; failures are kept in .hypothesis/ and replayed first on the next run.

Server fixture: one `inferplane serve` over `sum` (ONNX, FP32 [-1, 4] -> [-1, 1]) and `echo`
(a Python model echoing one input of every V2 datatype), with short header/body/keep-alive
timeouts so that a request the fuzzer leaves incomplete ends within a second, not after 30 s.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.fuzz.front import FuzzServer
from tests.integration.servers import ECHO_MODEL, ECHO_TYPES, start_server

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("FUZZ_CI_EXAMPLES", "50")),
    derandomize=True,
    deadline=timedelta(seconds=5),
    print_blob=True,
    suppress_health_check=_SLOW_OK,
)
settings.register_profile(
    "fuzz",
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "5000")),
    deadline=None,
    print_blob=True,
    suppress_health_check=_SLOW_OK,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzServer]:
    from inferplane.repository.register import register
    from inferplane.repository.schema import Batching
    from inferplane.repository.store import Repository
    from inferplane.tensors import TensorSpec
    from tests.conftest import write_onnx_model

    base = tmp_path_factory.mktemp("fuzz")
    repo = Repository(str(base / "repo"))
    register(
        repo,
        "sum",
        write_onnx_model(base / "src" / "model.onnx"),
        batching=Batching(max_batch_size=8, max_queue_delay_us=100),
    )
    echo = base / "echo"
    echo.mkdir()
    (echo / "model.py").write_text(ECHO_MODEL)
    register(
        repo,
        "echo",
        str(echo),
        inputs=[TensorSpec(n, t, [-1]) for n, t in ECHO_TYPES.items()],
        outputs=[TensorSpec(f"{n}_out", t, [-1]) for n, t in ECHO_TYPES.items()],
    )
    server = start_server(
        Path(repo.url),
        base,
        "--http-header-timeout", "0.5",
        "--http-body-timeout", "0.5",
        "--http-keepalive", "1",
        "--max-payload-mb", "1",
    )  # fmt: skip
    fuzz = FuzzServer(server)
    try:
        yield fuzz
    finally:
        fuzz.close()
        server.stop()
