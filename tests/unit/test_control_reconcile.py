"""The reconciler's plan: what it checks before anything is written."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import pytest
import yaml

from inferplane.control.manifest import Manifest, parse_manifest
from inferplane.control.reconcile import ApplyRefused, Plan, apply_plan, make_plan
from inferplane.repository import Repository
from inferplane.repository.register import register

MakeModel = Callable[..., str]


def manifest(doc: dict[str, Any], base: Path) -> Manifest:
    full = {"apiVersion": "inferplane.dev/v1", "kind": "Platform", **doc}
    return parse_manifest(yaml.safe_dump(full, sort_keys=False), "p.yaml", str(base))


def plan_for(doc: dict[str, Any], tmp_path: Path, repo: Repository, prune: bool = False) -> Plan:
    staging = tmp_path / f"staging-{uuid.uuid4().hex[:6]}"
    staging.mkdir()
    return make_plan(manifest(doc, tmp_path), repo, str(staging), prune=prune)


def refusal(doc: dict[str, Any], tmp_path: Path, repo: Repository, prune: bool = False) -> str:
    with pytest.raises(ApplyRefused) as info:
        plan_for(doc, tmp_path, repo, prune)
    return info.value.message


def digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def model(tmp_path: Path, make_onnx_model: MakeModel) -> str:
    return make_onnx_model(tmp_path / "m.onnx")


def test_the_plan_writes_nothing(tmp_path: Path, model: str) -> None:
    repo = Repository(str(tmp_path / "repo"))
    plan = plan_for({"models": {"t": {"versions": {1: {"artifact": "m.onnx"}}}}}, tmp_path, repo)
    assert [n.version for n in plan.new_versions] == [1]
    assert plan.new_versions[0].config.sha256 == {"m.onnx": digest(model)}
    assert plan.new_versions[0].config.inputs[0].shape == [-1, 4]  # from the artifact
    assert not (tmp_path / "repo").exists()
    apply_plan(plan)
    assert repo.list_versions("t") == [1]


def test_existing_versions_compare_what_the_file_declares(tmp_path: Path, model: str) -> None:
    repo = Repository(str(tmp_path / "repo"))
    register(repo, "t", model, metadata={"auc": 0.9})  # created_at is register's own
    same = {"artifact": "m.onnx", "metadata": {"auc": 0.9}}
    assert plan_for({"models": {"t": {"versions": {1: same}}}}, tmp_path, repo).lines == []

    message = refusal(
        {"models": {"t": {"versions": {1: {**same, "instances": 2, "runtime": "torch"}}}}},
        tmp_path,
        repo,
    )
    assert (
        "models.t.versions.1.instances: the repository's t version 1 has 1, the file says 2"
        in message
    )
    assert "models.t.versions.1.runtime" in message
    message = refusal({"models": {"t": {"versions": {1: {"artifact": "m.onnx"}}}}}, tmp_path, repo)
    assert 'metadata: the repository\'s t version 1 has {"auc": 0.9}, the file says {}' in message

    # with sha256 declared, the artifact is not read again (it may be gone)
    gone = {**same, "artifact": "missing.onnx", "sha256": digest(model)}
    assert plan_for({"models": {"t": {"versions": {1: gone}}}}, tmp_path, repo).lines == []
    message = refusal(
        {"models": {"t": {"versions": {1: {**same, "artifact": "missing.onnx"}}}}}, tmp_path, repo
    )
    assert "does not exist (declare its sha256 to compare without it)" in message


def test_a_folder_artifact_and_its_digests(tmp_path: Path) -> None:
    folder = tmp_path / "pm"
    (folder / "__pycache__").mkdir(parents=True)
    (folder / "model.py").write_text("class Model:\n    pass\n")
    (folder / "__pycache__" / "model.cpython-313.pyc").write_bytes(b"x")
    spec: dict[str, Any] = {
        "artifact": "pm",
        "runtime": "python",
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "n", "datatype": "INT64", "shape": [-1]}],
        "sha256": {"model.py": digest(folder / "model.py")},
    }
    repo = Repository(str(tmp_path / "repo"))
    plan = plan_for({"models": {"py": {"versions": {1: spec}}}}, tmp_path, repo)
    assert plan.lines == ["+ py version 1 (python, 1 files)"]
    apply_plan(plan)
    assert repo.read_config("py", 1).sha256 == {"pm/model.py": digest(folder / "model.py")}
    del spec["sha256"]
    assert plan_for({"models": {"py": {"versions": {1: spec}}}}, tmp_path, repo).lines == []

    (folder / "extra.py").write_text("X = 1\n")
    message = refusal({"models": {"py": {"versions": {1: spec}}}}, tmp_path, repo)
    assert "file 'extra.py' is in artifact pm, not in the repository" in message
    spec["sha256"] = "0" * 63 + "a"
    message = refusal({"models": {"py": {"versions": {2: spec}}}}, tmp_path, repo)
    assert "artifact pm is a folder (file -> digest), the file's sha256 one file" in message


def test_remote_artifacts_are_downloaded_before_register(tmp_path: Path, model: str) -> None:
    fs = fsspec.filesystem("memory")
    where = f"/apply-{uuid.uuid4().hex[:8]}/m.onnx"
    fs.put_file(model, where)
    repo = Repository(str(tmp_path / "repo"))
    doc = {"models": {"t": {"versions": {1: {"artifact": f"memory://{where}"}}}}}
    plan = plan_for(doc, tmp_path, repo)
    assert plan.new_versions[0].local_artifact.startswith(str(tmp_path))
    apply_plan(plan)
    assert repo.read_config("t", 1).sha256 == {"m.onnx": digest(model)}
    assert plan_for(doc, tmp_path, repo).lines == []  # compared by streaming the remote copy


def test_services_left_alone_still_guard_prune(tmp_path: Path, model: str) -> None:
    repo = Repository(str(tmp_path / "repo"))
    register(repo, "t", model)
    register(repo, "t", model)
    (tmp_path / "repo" / "services.yaml").write_text(
        "services:\n  s: {routes: [{model: t, version: 1, weight: 100}]}\n"
    )
    versions = {2: {"artifact": "m.onnx"}}
    doc: dict[str, Any] = {"models": {"t": {"versions": versions}}}
    message = refusal(doc, tmp_path, repo, prune=True)
    assert (
        "services.yaml in the repository: service 's' route 0: uses t version 1, which prune"
        in message
    )
    # a problem the file did not cause is not this apply's to refuse
    (tmp_path / "repo" / "services.yaml").write_text(
        "services:\n  s: {routes: [{model: gone, weight: 100}]}\n"
    )
    plan = plan_for(doc, tmp_path, repo, prune=True)
    assert plan.lines == ["- t version 1 (prune)"]
    (tmp_path / "repo" / "services.yaml").write_text("services: [\n")
    assert "prune cannot tell" in refusal(doc, tmp_path, repo, prune=True)


def test_final_state_references(tmp_path: Path, model: str) -> None:
    repo = Repository(str(tmp_path / "repo"))
    register(repo, "other", model)  # not in the file: left alone, still counted
    base = {"t": {"versions": {1: {"artifact": "m.onnx"}}, "aliases": {"production": 1}}}

    def services(*routes: dict[str, Any]) -> dict[str, Any]:
        return {"s": {"routes": [{**r, "weight": 100 / len(routes)} for r in routes]}}

    ok = plan_for(
        {"models": base, "services": services({"model": "t"}, {"model": "other", "version": 1})},
        tmp_path,
        repo,
    )
    assert any(n.startswith("models not in the file, left as they are: other") for n in ok.notes)
    message = refusal(
        {"models": base, "services": services({"model": "t", "version": "canary"})}, tmp_path, repo
    )
    assert "service 's' route 0: model 't' has no alias 'canary'" in message
    message = refusal(
        {"models": base, "services": services({"model": "nope"}, {"model": "t", "version": 3})},
        tmp_path,
        repo,
    )
    assert "model 'nope' is unknown" in message and "model 't' has no version 3" in message
    message = refusal(
        {"models": base, "services": {"other": services({"model": "t"})["s"]}}, tmp_path, repo
    )
    assert "service 'other' has the name of a model" in message
    shadow = {"routes": [{"model": "t", "weight": 100}], "shadow": {"model": "t", "version": 1}}
    message = refusal(
        {"models": {"t": {"versions": {}}}, "services": {"s": shadow}}, tmp_path, repo
    )
    assert "service 's' route 0: model 't' is unknown" in message
    assert "service 's' shadow: model 't' is unknown" in message


def test_services_equal_in_meaning_are_not_rewritten(tmp_path: Path, model: str) -> None:
    repo = Repository(str(tmp_path / "repo"))
    register(repo, "t", model)
    (tmp_path / "repo" / "services.yaml").write_text(
        "# hand-written\nservices:\n  s:\n    routes: [{model: t, version: '1', weight: 100.0}]\n"
        "    retries: {attempts: 0}\n"
    )
    doc = {
        "models": {"t": {"versions": {1: {"artifact": "m.onnx"}}}},
        "services": {"s": {"routes": [{"model": "t", "version": 1, "weight": 100}]}},
    }
    assert plan_for(doc, tmp_path, repo).lines == []
    doc["services"]["s"]["timeout_ms"] = 50  # type: ignore[index]
    plan = plan_for(doc, tmp_path, repo)
    assert plan.lines == ["~ service s: timeout_ms changed"]
    assert any(line.startswith("-# hand-written") for line in plan.services_diff())


def test_an_artifact_register_cannot_read_is_a_problem_not_a_traceback(
    tmp_path: Path, model: str
) -> None:
    (tmp_path / "bad.onnx").write_bytes(b"not a graph")
    repo = Repository(str(tmp_path / "repo"))
    versions = {
        1: {"artifact": "bad.onnx"},
        2: {"artifact": "none.onnx"},
        3: {"artifact": "m.onnx", "runtime": "torch"},
    }
    message = refusal({"models": {"t": {"versions": versions}}}, tmp_path, repo)
    assert "3 problems, nothing written" in message
    assert "models.t.versions.1: artifact bad.onnx cannot be read as a model: " in message
    assert "models.t.versions.2: artifact" in message and "does not exist" in message
    assert "declare inputs and outputs: [{name, datatype, shape}]" in message
    assert not (tmp_path / "repo").exists()
