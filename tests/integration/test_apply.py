"""`inferplane apply -f platform.yaml`: end to end through the CLI, on a local repository and on
S3 (moto), and a server that serves what apply wrote."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from inferplane.cli import app
from inferplane.repository import Repository
from tests.integration.servers import start_server

ROOT = Path(__file__).resolve().parents[2]
MakeModel = Callable[..., str]


def platform(
    models: dict[str, Any], services: dict[str, Any] | None = None, **top: Any
) -> dict[str, Any]:
    doc: dict[str, Any] = {"apiVersion": "inferplane.dev/v1", "kind": "Platform", **top}
    doc["models"] = models
    if services is not None:
        doc["services"] = services
    return doc


def reco(primary: str | int = "production", canary: str | int = "canary") -> dict[str, Any]:
    return {
        "reco": {
            "routes": [
                {"model": "tab", "version": primary, "weight": 90},
                {"model": "tab", "version": canary, "weight": 10},
            ]
        }
    }


def write(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def apply(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["apply", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def changes(output: str) -> list[str]:
    """The plan's change lines (not notes, not the summary, not the unified diff after them)."""
    lines: list[str] = []
    for line in output.splitlines():
        if line.startswith(("+++ ", "--- ")):
            break
        if line[:2] in ("+ ", "- ", "~ "):
            lines.append(line)
    return lines


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder`: (mtime_ns, size); any write shows."""
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.fixture
def artifacts(tmp_path: Path, make_onnx_model: MakeModel) -> Path:
    folder = tmp_path / "art"
    make_onnx_model(folder / "a.onnx", n_features=4)
    make_onnx_model(folder / "b.onnx", n_features=4)
    # same graph, different bytes: a third artifact whose digest differs
    make_onnx_model(folder / "c.onnx", n_features=4)
    with open(folder / "c.onnx", "ab") as fh:
        fh.write(b"\0")
    return folder


def two_versions(aliases: dict[str, int] | None = None) -> dict[str, Any]:
    return {
        "tab": {
            "versions": {
                1: {"artifact": "art/a.onnx", "batching": {"max_batch_size": 8}},
                2: {"artifact": "art/b.onnx", "metadata": {"auc": 0.91}},
            },
            "aliases": aliases if aliases is not None else {"production": 1, "canary": 2},
        }
    }


def test_apply_then_reapply_writes_nothing(tmp_path: Path, artifacts: Path) -> None:
    file = write(tmp_path / "platform.yaml", platform(two_versions(), reco(), repository="repo"))
    code, out = apply("-f", str(file))
    assert code == 0, out
    assert changes(out) == [
        f"+ tab version 1 (onnx, sha256 {sha(artifacts / 'a.onnx')[:12]}…)",
        f"+ tab version 2 (onnx, sha256 {sha(artifacts / 'b.onnx')[:12]}…)",
        "+ tab alias canary: 2",
        "+ tab alias production: 1",
        "+ service reco (routes tab:production 90%, tab:canary 10%)",
    ]
    assert "applied 5 changes" in out
    repo = Repository(str(tmp_path / "repo"))
    assert repo.list_versions("tab") == [1, 2]
    assert repo.aliases("tab") == {"canary": 2, "production": 1}
    v1 = repo.read_config("tab", 1)
    assert v1.batching is not None and v1.batching.max_batch_size == 8
    assert repo.read_config("tab", 2).metadata["auc"] == 0.91
    services = yaml.safe_load((tmp_path / "repo" / "services.yaml").read_text())
    assert services == {"services": reco()}

    before = snapshot(tmp_path / "repo")
    code, out = apply("-f", str(file), "--diff")
    assert code == 0, out
    assert changes(out) == []
    assert "no changes" in out
    assert snapshot(tmp_path / "repo") == before


def sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_alias_change_diff_shows_exactly_that(tmp_path: Path, artifacts: Path) -> None:
    file = write(tmp_path / "platform.yaml", platform(two_versions(), reco(), repository="repo"))
    assert apply("-f", str(file))[0] == 0
    aliases_file = tmp_path / "repo" / "tab" / "aliases.yaml"
    before = snapshot(tmp_path / "repo")

    moved = write(
        tmp_path / "platform.yaml",
        platform(two_versions({"production": 2, "canary": 2}), reco(), repository="repo"),
    )
    code, out = apply("-f", str(moved), "--diff", "--dry-run")
    assert code == 0, out
    assert changes(out) == ["~ tab alias production: 1 -> 2"]
    assert "dry run: 1 change planned, nothing written" in out
    assert snapshot(tmp_path / "repo") == before

    code, out = apply("-f", str(moved), "--diff")
    assert code == 0, out
    assert changes(out) == ["~ tab alias production: 1 -> 2"]
    assert Repository(str(tmp_path / "repo")).aliases("tab") == {"canary": 2, "production": 2}
    after = snapshot(tmp_path / "repo")
    assert {k for k in after if after[k] != before.get(k)} == {
        str(aliases_file.relative_to(tmp_path / "repo"))
    }

    # the canary goes to 50: only services.yaml changes, with a unified diff
    weights = reco()
    weights["reco"]["routes"][0]["weight"] = 50
    weights["reco"]["routes"][1]["weight"] = 50
    file = write(
        tmp_path / "platform.yaml",
        platform(two_versions({"production": 2, "canary": 2}), weights, repository="repo"),
    )
    code, out = apply("-f", str(file), "--diff")
    assert code == 0, out
    assert changes(out) == [
        "~ service reco routes: tab:production 90%, tab:canary 10% -> "
        "tab:production 50%, tab:canary 50%"
    ]
    assert "-      weight: 90" in out and "+      weight: 50" in out
    assert "+++ b/services.yaml" in out


def test_unsafe_delete_refused_and_safe_prune(tmp_path: Path, artifacts: Path) -> None:
    file = write(tmp_path / "platform.yaml", platform(two_versions(), reco(), repository="repo"))
    assert apply("-f", str(file))[0] == 0
    before = snapshot(tmp_path / "repo")
    only_two = {"tab": {"versions": {2: {"artifact": "art/b.onnx", "metadata": {"auc": 0.91}}}}}

    # an alias in the file still points at version 1
    only_two["tab"]["aliases"] = {"production": 1, "canary": 2}
    file = write(tmp_path / "platform.yaml", platform(only_two, reco(), repository="repo"))
    code, out = apply("-f", str(file), "--prune")
    assert code == 2
    assert "models.tab.aliases.production: points at version 1, which prune would delete" in out
    assert snapshot(tmp_path / "repo") == before

    # a service route uses version 1 by number
    only_two["tab"]["aliases"] = {"production": 2}
    file = write(
        tmp_path / "platform.yaml",
        platform(only_two, reco(primary="production", canary=1), repository="repo"),
    )
    code, out = apply("-f", str(file), "--prune")
    assert code == 2
    assert "service 'reco' route 1: uses tab version 1, which prune would delete" in out
    assert snapshot(tmp_path / "repo") == before

    # without prune, version 1 is kept (and said so); the alias to a version nobody has is refused
    file = write(
        tmp_path / "platform.yaml",
        platform(
            {"tab": {**only_two["tab"], "aliases": {"production": 7}}},
            reco(primary="production", canary=2),
            repository="repo",
        ),
    )
    code, out = apply("-f", str(file))
    assert code == 2
    assert "models.tab.aliases.production: version 7 is neither in the repository nor" in out

    # nothing uses version 1 any more: prune (in the file) deletes it, after the alias moved
    safe = platform(
        {"tab": {**only_two["tab"], "aliases": {"production": 2}}},
        reco(primary="production", canary=2),
        repository="repo",
        prune=True,
    )
    file = write(tmp_path / "platform.yaml", safe)
    code, out = apply("-f", str(file))
    assert code == 0, out
    assert changes(out) == [
        "- tab alias canary (was 2)",
        "~ tab alias production: 1 -> 2",
        "~ service reco routes: tab:production 90%, tab:canary 10% -> "
        "tab:production 90%, tab:2 10%",
        "- tab version 1 (prune)",
    ]
    repo = Repository(str(tmp_path / "repo"))
    assert repo.list_versions("tab") == [2]
    assert not (tmp_path / "repo" / "tab" / "1" / "model.yaml").exists()
    assert apply("-f", str(file))[1].count("no changes") == 1

    # the number of a pruned version is never given to other files
    safe["models"]["tab"]["versions"][1] = {"artifact": "art/c.onnx"}
    file = write(tmp_path / "platform.yaml", safe)
    code, out = apply("-f", str(file))
    assert code == 2
    assert "version numbers are never reused" in out


def test_bad_file_names_the_field(tmp_path: Path, artifacts: Path) -> None:
    doc = platform({"tab": {"versions": {1: {"artifact": "art/a.onnx", "batchin": {}}}}})
    file = write(tmp_path / "platform.yaml", doc)
    code, out = apply("-f", str(file), "-r", str(tmp_path / "repo"))
    assert code == 2
    assert "models.tab.versions.1.batchin: Extra inputs are not permitted" in out
    assert out.startswith("error: ")

    doc = platform(two_versions(), {"reco": {"routes": [{"model": "tab", "weight": 100, "x": 1}]}})
    code, out = apply("-f", str(write(file, doc)), "-r", str(tmp_path / "repo"))
    assert code == 2
    assert "services.reco.routes.0.x: Extra inputs are not permitted" in out

    doc = platform(two_versions())
    del doc["kind"]
    code, out = apply("-f", str(write(file, doc)), "-r", str(tmp_path / "repo"))
    assert code == 2 and "kind: Field required" in out

    code, out = apply("-f", str(write(file, platform(two_versions()))))
    assert code == 2 and "no repository" in out
    assert not (tmp_path / "repo").exists()


def test_sha256_mismatch_refused(tmp_path: Path, artifacts: Path) -> None:
    models = two_versions()
    models["tab"]["versions"][2]["sha256"] = sha(artifacts / "c.onnx")
    file = write(tmp_path / "platform.yaml", platform(models, repository="repo"))
    code, out = apply("-f", str(file))
    assert code == 2
    assert f"{sha(artifacts / 'c.onnx')[:12]}… in the file's sha256; refusing to register it" in out
    assert "models.tab.versions.2" in out
    assert not (tmp_path / "repo").exists()  # version 1 was fine, yet nothing is written

    models["tab"]["versions"][2]["sha256"] = sha(artifacts / "b.onnx")
    assert apply("-f", str(write(file, platform(models, repository="repo"))))[0] == 0
    # an existing version whose declared digest is not the stored one
    models["tab"]["versions"][2]["sha256"] = sha(artifacts / "c.onnx")
    code, out = apply("-f", str(write(file, platform(models, repository="repo"))))
    assert code == 2
    assert "models.tab.versions.2.sha256: tab version 2 in the repository has another" in out


def test_immutable_version_conflict_refused(tmp_path: Path, artifacts: Path) -> None:
    file = write(tmp_path / "platform.yaml", platform(two_versions(), repository="repo"))
    assert apply("-f", str(file))[0] == 0
    before = snapshot(tmp_path / "repo")

    models = two_versions()
    models["tab"]["versions"][1]["batching"] = {"max_batch_size": 16}
    models["tab"]["versions"][2]["artifact"] = "art/c.onnx"
    code, out = apply("-f", str(write(file, platform(models, repository="repo"))))
    assert code == 2
    assert "2 problems, nothing written" in out
    assert "models.tab.versions.1.batching: the repository's tab version 1 has" in out
    assert '"max_batch_size": 8' in out and '"max_batch_size": 16' in out
    assert "models.tab.versions.2.artifact: differs from tab version 2 in the repository" in out
    assert "versions are immutable" in out
    assert snapshot(tmp_path / "repo") == before


def test_dry_run_writes_nothing(tmp_path: Path, artifacts: Path) -> None:
    file = write(tmp_path / "platform.yaml", platform(two_versions(), reco(), repository="repo"))
    code, out = apply("-f", str(file), "--dry-run", "--diff")
    assert code == 0, out
    assert len(changes(out)) == 5
    assert "+++ b/services.yaml" in out
    assert "dry run: 5 changes planned, nothing written" in out
    assert not (tmp_path / "repo").exists()


def test_the_installed_command_exits_2_on_a_bad_file(tmp_path: Path) -> None:
    file = write(tmp_path / "platform.yaml", {"apiVersion": "inferplane.dev/v1", "kind": "Nope"})
    exe = Path(sys.executable).with_name("inferplane")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "inferplane"]
    proc = subprocess.run(
        [*cmd, "apply", "-f", str(file), "-r", str(tmp_path / "repo")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ")
    assert "kind: Input should be 'Platform'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_example_platform_file_matches_the_example_models(
    tmp_path: Path, example_build: tuple[Path, Path]
) -> None:
    # The examples as build_models.py lays them out (models/, artifacts/ and python_model/ side
    # by side), built for the session: the platform file's relative paths resolve the same way.
    built, artifacts = example_build
    shutil.copytree(built, tmp_path / "models")
    shutil.copytree(artifacts, tmp_path / "artifacts")
    shutil.copytree(ROOT / "examples" / "python_model", tmp_path / "python_model")
    shutil.copy(ROOT / "examples" / "platform.yaml", tmp_path / "platform.yaml")
    repo = tmp_path / "models"
    code, out = apply("-f", str(tmp_path / "platform.yaml"), "-r", str(repo), "--diff")
    assert code == 0, out
    assert "no changes" in out, out


# -- S3 ------------------------------------------------------------------------------------


def s3_objects(bucket: str) -> dict[str, tuple[str, str]]:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    return {
        key: (str(info.get("ETag")), str(info.get("LastModified")))
        for key, info in fs.find(bucket, detail=True).items()
    }


def test_apply_on_s3(tmp_path: Path, artifacts: Path, moto_s3: Any) -> None:
    import s3fs

    bucket = moto_s3.new_bucket("apply")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    for name in ("a.onnx", "b.onnx"):
        fs.put_file(str(artifacts / name), f"{bucket}/artifacts/{name}")
    models = two_versions()
    models["tab"]["versions"][1]["artifact"] = f"s3://{bucket}/artifacts/a.onnx"
    models["tab"]["versions"][2]["artifact"] = f"s3://{bucket}/artifacts/b.onnx"
    models["tab"]["versions"][2]["sha256"] = sha(artifacts / "b.onnx")
    url = f"s3://{bucket}/models"
    file = write(tmp_path / "platform.yaml", platform(models, reco(), repository=url))

    code, out = apply("-f", str(file), "--diff")
    assert code == 0, out
    assert len(changes(out)) == 5
    repo = Repository(url)
    assert repo.list_versions("tab") == [1, 2]
    assert repo.read_config("tab", 1).sha256 == {"a.onnx": sha(artifacts / "a.onnx")}
    assert repo.aliases("tab") == {"canary": 2, "production": 1}
    assert "reco" in fs.cat_file(f"{bucket}/models/services.yaml").decode()

    before = s3_objects(bucket)
    code, out = apply("-f", str(file))
    assert code == 0, out
    assert "no changes" in out and changes(out) == []
    assert s3_objects(bucket) == before

    models["tab"]["aliases"] = {"production": 2, "canary": 2}
    code, out = apply("-f", str(write(file, platform(models, reco(), repository=url))))
    assert code == 0, out
    assert changes(out) == ["~ tab alias production: 1 -> 2"]
    after = s3_objects(bucket)
    assert {k for k in after if after[k] != before.get(k)} == {f"{bucket}/models/tab/aliases.yaml"}

    # prune on S3: version 1 goes (nothing refers to it any more)
    del models["tab"]["versions"][1]
    code, out = apply("-f", str(write(file, platform(models, reco(), repository=url))), "--prune")
    assert code == 0, out
    assert changes(out) == ["- tab version 1 (prune)"]
    assert Repository(url).list_versions("tab") == [2]
    assert not fs.exists(f"{bucket}/models/tab/1/a.onnx")


# -- served --------------------------------------------------------------------------------


def test_applied_services_are_served(tmp_path: Path, artifacts: Path) -> None:
    services = {"reco": {"routes": [{"model": "tab", "version": "production", "weight": 100}]}}
    file = write(
        tmp_path / "platform.yaml",
        platform(two_versions({"production": 2}), services, repository="repo"),
    )
    assert apply("-f", str(file))[0] == 0
    server = start_server(tmp_path / "repo", tmp_path, grpc=False)
    try:
        body = json.dumps(
            {
                "inputs": [
                    {"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}
                ]
            }
        ).encode()
        request = urllib.request.Request(
            f"{server.url}/v2/models/reco/infer",
            data=body,
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
            route = response.headers.get("x-inferplane-route")
        assert answer["model_name"] == "tab"
        assert answer["model_version"] == "2"
        assert answer["outputs"][0]["data"] == [10.0]
        assert route == "primary"
    finally:
        server.stop()
    assert os.path.exists(tmp_path / "repo" / "services.yaml")


def test_the_file_from_standard_input(tmp_path: Path, artifacts: Path) -> None:
    models = two_versions()
    for spec in models["tab"]["versions"].values():
        spec["artifact"] = str(tmp_path / spec["artifact"])  # relative paths start at the cwd
    text = yaml.safe_dump(platform(models), sort_keys=False)
    result = CliRunner().invoke(
        app, ["apply", "-f", "-", "-r", str(tmp_path / "repo"), "--dry-run"], input=text
    )
    assert result.exit_code == 0, result.output
    assert "dry run: 4 changes planned" in result.output
    env = {"INFERPLANE_REPOSITORY": str(tmp_path / "env-repo")}
    result = CliRunner().invoke(app, ["apply", "-f", "-"], input=text, env=env)
    assert result.exit_code == 0, result.output
    assert Repository(str(tmp_path / "env-repo")).list_versions("tab") == [1, 2]
