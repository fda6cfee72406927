"""`inferplane serve --pickles` on a real server over a repository with a pickled (scikit-learn)
model and an ONNX one: refuse keeps the pickle unloaded with its reason and serves the rest; warn
serves both and says so in the log."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import joblib
import pytest
from sklearn.linear_model import LogisticRegression

from inferplane.repository.register import register
from inferplane.repository.store import Repository
from tests.conftest import write_onnx_model
from tests.integration.servers import ServerProcess, start_server

REASON = "refused to load pickled artifact 'forest.joblib'"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("pickles")
    repository = Repository(str(base / "repo"))
    model = LogisticRegression().fit([[0, 0, 0, 0], [1, 1, 1, 1]], [0, 1])
    joblib.dump(model, base / "forest.joblib")
    register(repository, "forest", str(base / "forest.joblib"))
    register(repository, "sum", write_onnx_model(base / "src" / "model.onnx"))
    return base / "repo"


@pytest.fixture
def serve() -> Iterator[list[ServerProcess]]:
    """Servers a test started, stopped after it whatever happens."""
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.stop()


def infer(server: ServerProcess, model: str) -> httpx.Response:
    datatype = "FP64" if model == "forest" else "FP32"  # sklearn's signature takes float64
    feed = {"name": "input", "datatype": datatype, "shape": [1, 4], "data": [1, 1, 1, 1]}
    return httpx.post(f"{server.url}/v2/models/{model}/infer", json={"inputs": [feed]}, timeout=30)


def test_refuse_serves_onnx_and_leaves_the_pickle_unloaded_with_the_reason(
    repo: Path, tmp_path: Path, serve: list[ServerProcess]
) -> None:
    server = start_server(repo, tmp_path, "--pickles", "refuse")
    serve.append(server)
    answer = infer(server, "sum")
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["data"] == [4.0]

    assert httpx.get(f"{server.url}/v2/models/forest/ready").status_code == 503
    refused = infer(server, "forest")
    assert refused.status_code == 503 and REASON in refused.json()["error"]
    index = {row["name"]: row for row in httpx.post(f"{server.url}/v2/repository/index").json()}
    assert index["sum"]["state"] == "READY"
    assert index["forest"]["state"] == "FAILED"
    assert REASON in index["forest"]["reason"] and "--pickles refuse" in index["forest"]["reason"]
    assert f"model forest version 1 failed to load: {REASON}" in server.log()
    # asking again does not get around it
    again = httpx.post(f"{server.url}/v2/repository/models/forest/load", timeout=60)
    assert again.status_code == 400 and REASON in again.json()["error"]
    assert infer(server, "sum").status_code == 200


def test_warn_serves_both_and_logs_one_warning(
    repo: Path, tmp_path: Path, serve: list[ServerProcess]
) -> None:
    server = start_server(repo, tmp_path)  # warn is the default
    serve.append(server)
    answer = infer(server, "forest")
    assert answer.status_code == 200, answer.text
    assert infer(server, "sum").status_code == 200
    digest = Repository(str(repo)).read_config("forest", 1).sha256["forest.joblib"]
    warnings = [line for line in server.log().splitlines() if "pickled artifact" in line]
    assert len(warnings) == 1, warnings
    assert "model forest version 1 loads pickled artifact 'forest.joblib'" in warnings[0]
    assert f"sha256 {digest[:12]}... pinned in model.yaml" in warnings[0]
    assert "docs/security.md" in warnings[0]


def test_allow_is_silent(repo: Path, tmp_path: Path, serve: list[ServerProcess]) -> None:
    server = start_server(repo, tmp_path, "--pickles", "allow")
    serve.append(server)
    assert infer(server, "forest").status_code == 200
    assert "pickled artifact" not in server.log()


def test_an_unknown_value_is_refused_at_start(repo: Path, tmp_path: Path) -> None:
    server = start_server(repo, tmp_path, "--pickles", "sometimes", wait=False)
    assert server.process.wait(60) == 2
    assert "use warn, allow or refuse" in server.log()
