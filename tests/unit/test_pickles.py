"""`serve --pickles warn|allow|refuse`: which runtimes unpickle, and what each policy does at load."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import joblib
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from inferplane.engine.manager import ModelManager, State
from inferplane.errors import RepositoryError
from inferplane.observability.metrics import Metrics
from inferplane.repository.register import register
from inferplane.repository.store import Repository
from inferplane.runtimes import create_runtime
from inferplane.runtimes.base import check_pickles
from inferplane.tensors import TensorSpec
from tests.conftest import write_onnx_model


class Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class Planted:
    """A "model" whose unpickling makes a folder: what any code in a pickle could do instead."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.marker,))


def sklearn_artifact(path: Path) -> Path:
    model = LogisticRegression().fit([[0, 0, 0, 0], [1, 1, 1, 1]], [0, 1])
    joblib.dump(model, path)
    return path


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    """`forest` (scikit-learn, two versions) and `sum` (ONNX) in one repository."""
    repo = Repository(str(tmp_path / "repo"))
    artifact = sklearn_artifact(tmp_path / "forest.joblib")
    register(repo, "forest", str(artifact))
    register(repo, "forest", str(artifact))
    register(repo, "sum", write_onnx_model(tmp_path / "sum" / "model.onnx"))
    return repo


def runtime_of(repo: Repository, model: str, version: int = 1) -> Any:
    config = repo.read_config(model, version)
    return create_runtime(config, repo.fetch(config))


def test_the_runtimes_that_unpickle_say_so(repo: Repository, tmp_path: Path) -> None:
    assert runtime_of(repo, "forest").pickled_files() == ["forest.joblib"]
    assert runtime_of(repo, "sum").pickled_files() == []

    module = Linear().eval()
    x = torch.zeros(2, 4)
    exported = tmp_path / "linear.pt2"
    torch.export.save(
        torch.export.export(module, (x,), dynamic_shapes=({0: torch.export.Dim("b")},)),
        str(exported),
    )
    scripted = tmp_path / "linear.pt"
    torch.jit.script(module).save(str(scripted))
    register(repo, "exported", str(exported))
    register(
        repo,
        "scripted",
        str(scripted),
        inputs=[TensorSpec("x", "FP32", [-1, 4])],
        outputs=[TensorSpec("y", "FP32", [-1, 1])],
    )
    # torch.export.load unpickles the weights (weights_only=False); TorchScript's loader does not
    assert runtime_of(repo, "exported").pickled_files() == ["linear.pt2"]
    assert runtime_of(repo, "scripted").pickled_files() == []


def test_warn_names_the_file_its_pin_and_the_docs(
    repo: Repository, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = runtime_of(repo, "forest", 2)
    digest = runtime.config.sha256["forest.joblib"]
    with caplog.at_level(logging.WARNING, logger="inferplane.engine"):
        check_pickles(runtime, "warn")
    (record,) = caplog.records
    text = record.getMessage()
    assert record.levelno == logging.WARNING
    assert "model forest version 2 loads pickled artifact 'forest.joblib'" in text
    assert f"sha256 {digest[:12]}... pinned in model.yaml, verified before loading" in text
    assert "docs/security.md" in text and "--pickles refuse" in text


def test_warn_says_when_nothing_pins_the_file(
    repo: Repository, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = runtime_of(repo, "forest")
    runtime.config = runtime.config.model_copy(update={"sha256": {}})
    with caplog.at_level(logging.WARNING, logger="inferplane.engine"):
        check_pickles(runtime, "warn")
    assert "forest.joblib: no sha256 pin in model.yaml" in caplog.text


def test_allow_is_silent_and_refuse_raises(
    repo: Repository, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="inferplane.engine"):
        check_pickles(runtime_of(repo, "forest"), "allow")
        check_pickles(runtime_of(repo, "sum"), "refuse")  # nothing pickled: nothing to refuse
    assert caplog.records == []
    with pytest.raises(RepositoryError, match=r"refused to load pickled artifact 'forest\.joblib'"):
        check_pickles(runtime_of(repo, "forest"), "refuse")


async def test_refuse_leaves_pickled_versions_unavailable_and_others_serving(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: object, **kwargs: object) -> object:
        raise AssertionError("a refused artifact was unpickled")

    monkeypatch.setattr(joblib, "load", never)
    manager = ModelManager(repo, Metrics(), pickles="refuse")
    await manager.load_initial()
    try:
        assert manager.ready  # the server is up: a refused model does not hold it out
        assert manager.entry("sum").versions[1].state is State.READY
        for lv in manager.entry("forest").versions.values():
            assert lv.state is State.FAILED
            assert "refused to load pickled artifact 'forest.joblib'" in lv.reason
            assert "--pickles refuse" in lv.reason
    finally:
        await manager.close()


async def test_warn_loads_and_warns_once_per_version(
    repo: Repository, caplog: pytest.LogCaptureFixture
) -> None:
    manager = ModelManager(repo, Metrics())  # warn is the default
    with caplog.at_level(logging.WARNING, logger="inferplane.engine"):
        await manager.load_initial()
    try:
        assert all(lv.state is State.READY for lv in manager.entry("forest").versions.values())
        warnings = [r.getMessage() for r in caplog.records if "pickled artifact" in r.getMessage()]
        assert sorted(w.split(" loads ")[0] for w in warnings) == [
            "model forest version 1",
            "model forest version 2",
        ]
    finally:
        await manager.close()


async def test_what_refuse_protects_from(tmp_path: Path) -> None:
    """A pickle runs its code while it loads: refused, it never does; warned about, it has."""
    planted = tmp_path / "planted.joblib"
    marker = tmp_path / "code-ran"
    planted.write_bytes(pickle.dumps(Planted(str(marker))))
    repo = Repository(str(tmp_path / "repo"))
    register(
        repo,
        "planted",
        str(planted),
        runtime="sklearn",
        inputs=[TensorSpec("x", "FP64", [-1, 4])],
        outputs=[TensorSpec("predict", "INT64", [-1])],
    )
    refused = ModelManager(repo, Metrics(), pickles="refuse")
    await refused.load_initial()
    await refused.close()
    assert refused.entry("planted").versions[1].state is State.FAILED
    assert not marker.exists()

    warned = ModelManager(repo, Metrics(), pickles="warn")
    await warned.load_initial()
    await warned.close()
    assert marker.exists()  # the sha256 pin matched: it only proves the file is the registered one
    # what it unpickled to (None) is no estimator: unavailable, but the code had run already
    assert warned.entry("planted").versions[1].state is State.FAILED


def test_an_unknown_policy_is_a_programming_error(repo: Repository) -> None:
    with pytest.raises(ValueError, match="pickles is one of warn, allow, refuse"):
        ModelManager(repo, Metrics(), pickles="maybe")


async def test_refuse_still_serves_a_version_optimized_to_onnx(tmp_path: Path) -> None:
    """`models register --optimize` stores an ONNX copy that serves instead of the pickle: no
    unpickling at load, so nothing to refuse."""
    from inferplane.repository.optimize import OptimizeOptions

    repo = Repository(str(tmp_path / "repo"))
    artifact = sklearn_artifact(tmp_path / "forest.joblib")
    config = register(repo, "forest", str(artifact), optimize=OptimizeOptions(timing_s=0.1))
    assert config.optimized is not None and config.optimized.enabled, config.metadata
    manager = ModelManager(repo, Metrics(), pickles="refuse")
    await manager.load_initial()
    try:
        lv = manager.entry("forest").versions[1]
        assert lv.state is State.READY, lv.reason
        assert lv.platform == "sklearn_joblib+onnx"
    finally:
        await manager.close()
