"""The platform file's schema: strict, every message names the field's path."""

from __future__ import annotations

from pathlib import Path

import pytest

from inferplane.control.manifest import load_manifest, parse_manifest
from inferplane.errors import BadRequest

ROOT = Path(__file__).resolve().parents[2]
HEAD = "apiVersion: inferplane.dev/v1\nkind: Platform\n"


def refused(text: str) -> str:
    with pytest.raises(BadRequest) as info:
        parse_manifest(text, "p.yaml")
    return info.value.message


def test_minimal_file_and_defaults() -> None:
    manifest = parse_manifest(
        HEAD + "models:\n  tab:\n    versions:\n      '1': {artifact: a.onnx}\n", "p.yaml", "/x"
    )
    spec = manifest.models["tab"].versions[1]
    assert spec.instances == 1 and spec.device == "cpu" and spec.batching is None
    assert manifest.models["tab"].aliases == {}
    assert manifest.policy is None and manifest.services_doc is None  # services.yaml left alone
    assert manifest.base_dir == "/x" and not manifest.platform.prune


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            "models:\n  tab:\n    versions:\n      1: {atifact: a}\n",
            "models.tab.versions.1.atifact: Extra inputs are not permitted",
        ),
        (
            "models:\n  tab:\n    version: {}\n",
            "models.tab.version: Extra inputs are not permitted",
        ),
        ("model: {}\n", "model: Extra inputs are not permitted"),
        (
            "models:\n  tab:\n    versions:\n      1: {artifact: a, batching: {max_batch: 3}}\n",
            "models.tab.versions.1.batching.max_batch: Extra inputs",
        ),
        (
            "models:\n  tab:\n    versions:\n      1: {artifact: a, device: gpu}\n",
            "models.tab.versions.1.device: device is cpu, cuda or cuda:N",
        ),
        (
            "models:\n  tab:\n    versions:\n      0: {artifact: a}\n",
            "models.tab.versions: version 0 is out of range",
        ),
        ("models:\n  tab:\n    versions:\n      x: {artifact: a}\n", "models.tab.versions.x.[key]"),
        ("models:\n  tab:\n    aliases: {9lives: 1}\n", "models.tab.aliases: alias '9lives'"),
        ("models:\n  ../etc: {}\n", "models: model name '../etc' contains"),
        (
            "models:\n  tab:\n    versions:\n      1: {artifact: a, sha256: abc}\n",
            "models.tab.versions.1.sha256: 'abc' is not a sha256 digest",
        ),
        (
            "models:\n  tab:\n    versions:\n      1: {artifact: a, sha256: 1234}\n",
            "a sha256 digest is text: quote it",
        ),
        (
            "models:\n  tab:\n    versions:\n      1: {artifact: a, inputs: [{name: x, datatype: FP33, shape: [-1]}]}\n",
            "models.tab.versions.1.inputs.0.datatype: unknown datatype 'FP33'",
        ),
        (
            "models:\n  tab:\n    versions:\n      1: {artifact: a, resources: {memory: lots}}\n",
            "models.tab.versions.1.resources.memory",
        ),
        (
            "services:\n  reco: {routes: [{model: tab, weight: 60}]}\n",
            "services.reco: route weights add up to 60, not 100",
        ),
        (
            "services:\n  reco: {routes: [{model: tab, weight: 100}], shadw: {}}\n",
            "services.reco.shadw: Extra inputs are not permitted",
        ),
        ("prune: maybe\n", "prune: Input should be a valid boolean"),
    ],
)
def test_a_bad_field_is_named(body: str, expected: str) -> None:
    message = refused(HEAD + body)
    assert message.startswith("p.yaml: ")
    assert expected in message


def test_api_version_kind_and_top_level() -> None:
    assert "apiVersion: Field required" in refused("kind: Platform\n")
    assert "apiVersion: Input should be 'inferplane.dev/v1'" in refused(
        "apiVersion: inferplane.dev/v2\nkind: Platform\n"
    )
    assert "kind: Input should be 'Platform'" in refused(
        "apiVersion: inferplane.dev/v1\nkind: Deployment\n"
    )
    assert "expected a mapping" in refused("- a\n- b\n")
    assert "not valid YAML" in refused("models: [\n")


def test_a_key_given_twice_is_refused() -> None:
    message = refused(HEAD + "models:\n  tab:\n    aliases: {production: 1, production: 2}\n")
    assert "key 'production' is given twice" in message
    message = refused(HEAD + "models: {}\nmodels: {}\n")
    assert "key 'models' is given twice" in message


def test_services_and_audit_become_the_services_file() -> None:
    manifest = parse_manifest(
        HEAD + "services:\n  reco: {routes: [{model: tab, version: 2, weight: 100}]}\n"
        "audit:\n  redact: [{target: '*', field: email, action: hash}]\n",
        "p.yaml",
    )
    assert manifest.services_doc is not None and set(manifest.services_doc) == {"services", "audit"}
    assert manifest.policy is not None
    assert manifest.policy.services["reco"].routes[0].version == "2"
    empty = parse_manifest(HEAD + "services: {}\n", "p.yaml")
    assert empty.policy is not None and empty.policy.services == {}  # managed, and empty


def test_folder_digests_and_sha256_prefix() -> None:
    digest = "AB" * 32
    manifest = parse_manifest(
        HEAD
        + f"models:\n  t:\n    versions:\n      1: {{artifact: m, sha256: {{model.py: 'sha256:{digest}'}}}}\n"
        f"      2: {{artifact: a.onnx, sha256: '{digest}'}}\n",
        "p.yaml",
    )
    versions = manifest.models["t"].versions
    assert versions[1].digests() == {"model.py": digest.lower()}
    assert versions[2].digests() == {"": digest.lower()}


def test_the_example_file_parses() -> None:
    manifest = load_manifest(str(ROOT / "examples" / "platform.yaml"))
    assert set(manifest.models) >= {"tabular", "tabular_skl", "text_stats"}
    assert manifest.models["tabular"].aliases == {"production": 1, "canary": 2}
    assert manifest.policy is not None and "reco" in manifest.policy.services
    assert manifest.platform.repository == "models"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BadRequest, match="does not exist"):
        load_manifest(str(tmp_path / "nope.yaml"))
