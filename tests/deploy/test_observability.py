"""deploy/observability: the Prometheus rules pass promtool (syntax and their unit tests), the
Grafana dashboard is well formed and its queries parse, deploy/k8s/monitoring ships exactly
these rules and this dashboard, and every metric the dashboard and the rules read is exported
by a real server, the stream worker's registry or the batch job's, so that no panel goes blank
because a metric was renamed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from tests.integration.conftest import example_build  # noqa: F401 - the session fixture
from tests.integration.servers import ROOT, start_server

OBSERVABILITY = ROOT / "deploy" / "observability"
RULES = OBSERVABILITY / "prometheus" / "rules.yaml"
RULE_TESTS = OBSERVABILITY / "prometheus" / "rules.test.yaml"
DASHBOARD = OBSERVABILITY / "grafana" / "inferplane.json"
PROMETHEUS_RULE = ROOT / "deploy" / "k8s" / "monitoring" / "prometheusrule.yaml"
# Grafana's variables, replaced by values for promtool to parse the dashboard's queries.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$model": "tabular",
                     "$version": "1", "$service": "reco"}  # fmt: skip
SUFFIXES = ("_bucket", "_sum", "_count", "_created")
METRIC = re.compile(r"\binferplane[a-z0-9_:]*")


def _promtool() -> str:
    path = shutil.which("promtool") or (
        "/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None
    )
    if path is None:
        pytest.fail(
            "needs promtool: run ./scripts/system_deps.sh (apt-get install prometheus)",
            pytrace=False,
        )
    return path


def _rules() -> dict:
    return yaml.safe_load(RULES.read_text())


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict) -> list[dict]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found += panel.get("panels", [])  # collapsed rows hold their panels
    return found


def _dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in _panels(_dashboard()) for t in p["targets"]]
    for var in _dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            found = re.fullmatch(r"label_values\((.*), *\w+\)", query)
            assert found, f"variable {var['name']}: {query}"
            exprs.append(found.group(1))
    return exprs


def _rule_exprs() -> list[str]:
    return [r["expr"] for g in _rules()["groups"] for r in g["rules"]]


def _recorded() -> set[str]:
    return {r["record"] for g in _rules()["groups"] for r in g["rules"] if "record" in r}


def _base(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _read_metrics(exprs: list[str]) -> set[str]:
    """The raw metric names `exprs` read: recording rules left out, histogram suffixes off."""
    names = {m for e in exprs for m in METRIC.findall(e)}
    return {_base(n) for n in names if n not in _recorded()}


# promtool -------------------------------------------------------------------------------
def test_promtool_checks_the_rules() -> None:
    out = subprocess.run(
        [_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_the_rules_pass_their_promtool_unit_tests() -> None:
    out = subprocess.run(
        [_promtool(), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
        timeout=120, cwd=RULE_TESTS.parent,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_the_unit_tests_cover_every_alert_firing_and_silent_and_the_p95_rule() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())
    alerts = {r["alert"] for g in _rules()["groups"] for r in g["rules"] if "alert" in r}
    cases = [c for t in tests["tests"] for c in t.get("alert_rule_test", [])]
    firing = {c["alertname"] for c in cases if c["exp_alerts"]}
    silent = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert firing == alerts, f"never shown firing: {alerts - firing}"
    assert silent == alerts, f"never shown silent: {alerts - silent}"
    exprs = [c["expr"] for t in tests["tests"] for c in t.get("promql_expr_test", [])]
    assert any("inferplane:request_duration_seconds:p95_5m" in e for e in exprs)
    for group in _rules()["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["annotations"]["summary"] and rule["annotations"]["description"]
                # The SLO alerts page or open a ticket (docs/observability.md#slo-alerts).
                slo = group["name"] == "inferplane.slo"
                severities = ("page", "ticket") if slo else ("warning", "critical")
                assert rule["labels"]["severity"] in severities, rule["alert"]
            else:
                assert re.fullmatch(r"inferplane:[a-z0-9_]+:[a-z0-9_]+", rule["record"])


def test_the_dashboard_queries_parse(tmp_path: Path) -> None:
    """Each query, Grafana's variables filled in, as a recording rule for promtool to parse."""
    rules = []
    for i, expr in enumerate(_dashboard_exprs()):
        for var, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
        rules.append({"record": f"dashboard:query:q{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run(
        [_promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


# the dashboard --------------------------------------------------------------------------
def test_the_dashboard_is_well_formed() -> None:
    dashboard = _dashboard()
    assert dashboard["schemaVersion"] >= 38
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name, source in (("model", "inferplane_requests_total"),
                         ("service", "inferplane_route_decisions_total")):  # fmt: skip
        query = variables[name]["query"]
        query = query["query"] if isinstance(query, dict) else query
        assert query == f"label_values({source}, {name})"
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["title"], panel["id"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"{panel['title']}: no queries"
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], panel["title"]
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= set(grid), panel["title"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if "repeat" in panel:
            assert panel["repeat"] in variables, panel["title"]


def test_the_dashboard_has_the_panels_the_platform_team_reads() -> None:
    by_title = {
        p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in _panels(_dashboard())
    }
    wanted = {
        "Request rate": ["inferplane:requests:rate5m"],
        "Error rate by status code": ["inferplane:requests:rate5m", "status"],
        "Latency heatmap: $model": ["inferplane_request_duration_seconds_bucket"],
        "Latency p50 / p95 / p99": [f"inferplane:request_duration_seconds:p{q}_5m" for q in (50, 95, 99)],
        "Queue time p50 / p95": ["inferplane:queue_duration_seconds:p95_5m"],
        "Batch size distribution": ["inferplane_batch_size_bucket"],
        "Route split per service": ["inferplane:route_decisions:rate5m"],
        "Shadow divergence per service": ["inferplane:shadow_disagreeing_rows:ratio_rate5m"],
        "Resident models": ["inferplane_models_resident"],
        "Model memory against the budget": ["inferplane_resident_bytes", "inferplane_memory_budget_bytes"],
        "Model loads, failures and evictions": [
            "inferplane_model_loads_total",
            "inferplane_model_load_failures_total",
            "inferplane_model_evictions_total",
        ],
        "In-flight requests and queue depth": ["inferplane_inflight_requests", "inferplane_queue_depth"],
        "Stream consumer lag": ["inferplane_stream_consumer_lag)", "inferplane_stream_consumer_lag_seconds",
                                "inferplane_stream_end_to_end_lag_seconds_bucket"],
        "Batch job progress": ["inferplane_batch_rows_processed_total", "inferplane_batch_rows_planned"],
        "Batch job rows and files": ["inferplane_batch_rows_total", "inferplane_batch_fragments",
                                     "inferplane_batch_job_start_time_seconds"],
    }  # fmt: skip
    for title, needles in wanted.items():
        assert title in by_title, f"no panel '{title}'"
        for needle in needles:
            assert needle in by_title[title], f"panel '{title}' does not query {needle}"
    heatmaps = [p for p in _panels(_dashboard()) if p["type"] == "heatmap"]
    assert heatmaps and all(t.get("format") == "heatmap" for p in heatmaps for t in p["targets"])


def test_the_dashboard_reads_only_recording_rules_that_exist() -> None:
    used = {m for e in _dashboard_exprs() for m in METRIC.findall(e) if ":" in m}
    assert used, "the dashboard reads the recording rules"
    assert used <= _recorded(), f"not recorded by rules.yaml: {used - _recorded()}"
    in_rules = {m for e in _rule_exprs() for m in METRIC.findall(e) if ":" in m}
    assert in_rules <= _recorded()


# Kubernetes -----------------------------------------------------------------------------
def render_prometheus_rule() -> str:
    """deploy/k8s/monitoring/prometheusrule.yaml as it must be: rules.yaml's groups."""
    header, _, _ = PROMETHEUS_RULE.read_text().partition("apiVersion:")
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "inferplane",
            "labels": {
                "app.kubernetes.io/name": "inferplane",
                "app.kubernetes.io/component": "monitoring",
            },
        },
        "spec": {"groups": _rules()["groups"]},
    }

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
        style = "|" if "\n" in data else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    Dumper.add_representer(str, text)
    body = yaml.dump(doc, Dumper=Dumper, sort_keys=False, width=100, allow_unicode=True)
    return header + body


def _render(tree: Path) -> list[dict]:
    kubectl = Path(sys.executable).parent / "kubectl"
    out = subprocess.run(
        [str(kubectl) if kubectl.exists() else "kubectl", "kustomize", str(tree)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_the_prometheus_rule_is_the_rules_file() -> None:
    assert PROMETHEUS_RULE.read_text() == render_prometheus_rule(), (
        "deploy/k8s/monitoring/prometheusrule.yaml differs from rules.yaml: regenerate it with "
        "`.venv/bin/python -m tests.deploy.test_observability --write-prometheus-rule`"
    )
    docs = _render(ROOT / "deploy" / "k8s" / "monitoring")
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rule["spec"]["groups"] == _rules()["groups"]


def test_the_monitoring_tree_ships_the_dashboard_to_grafanas_sidecar() -> None:
    docs = _render(ROOT / "deploy" / "k8s" / "monitoring")
    assert {d["kind"] for d in docs} == {
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
        "ConfigMap",
    }
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["data"] == {"inferplane.json": DASHBOARD.read_text()}


# the metrics exist ----------------------------------------------------------------------
def _exposed(text: str) -> set[str]:
    """Metric names in a /metrics page: declared (# TYPE) or sampled, histogram suffixes off."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return {_base(n) for n in names}


def _stream_metrics() -> set[str]:
    from prometheus_client import generate_latest

    from inferplane.streaming.metrics import StreamMetrics

    return _exposed(generate_latest(StreamMetrics().registry).decode())


def _batch_metrics() -> set[str]:
    import io

    from prometheus_client import generate_latest

    from inferplane.batch.progress import BatchMetrics, JobProgress

    metrics = BatchMetrics(job="j", target="t", engine="local")
    with metrics.watch():
        JobProgress(10, 1, stream=io.StringIO(), fancy=False)
    return _exposed(generate_latest(metrics.registry).decode())


def test_every_metric_read_is_exported(
    example_build: tuple[Path, Path],  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    read = _read_metrics(_dashboard_exprs() + _rule_exprs())
    stream, batch = _stream_metrics(), _batch_metrics()
    assert {"inferplane_stream_consumer_lag", "inferplane_batch_fragments"} <= stream | batch

    server = start_server(example_build[0], tmp_path, "--memory-budget", "4GiB", grpc=False)
    try:
        x = np.random.default_rng(0).standard_normal(64).round(3).tolist()
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 32],
                            "data": x}]}  # fmt: skip
        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert client.post("/v2/models/tabular/infer", json=body).status_code == 200
            assert client.post("/v2/models/nope/infer", json=body).status_code == 404
            for i in range(150):  # the shadow gets 10% of reco's calls
                answer = client.post(
                    "/v2/models/reco/infer", json=body, headers={"x-user": f"u{i}"}
                )
                assert answer.status_code == 200, answer.text
            page = client.get("/metrics").text
    finally:
        server.stop()
    exported = _exposed(page)
    samples = {re.split(r"[{ ]", line, maxsplit=1)[0] for line in page.splitlines()
               if line.startswith("inferplane")}  # fmt: skip
    # The traffic above made these move, so they are not only declared but sampled.
    for name in ("inferplane_requests_total", "inferplane_request_duration_seconds_bucket",
                 "inferplane_queue_duration_seconds_bucket", "inferplane_batch_size_bucket",
                 "inferplane_route_decisions_total", "inferplane_shadow_requests_total",
                 "inferplane_shadow_compared_rows_total", "inferplane_shadow_disagreeing_rows_total",
                 "inferplane_shadow_abs_difference_bucket", "inferplane_memory_budget_bytes",
                 "inferplane_resident_bytes", "inferplane_models_resident",
                 "inferplane_queue_depth", "inferplane_model_loads_total"):  # fmt: skip
        assert name in samples, f"{name}: no sample after traffic"
    missing = read - exported - stream - batch
    assert not missing, f"the dashboard or the rules read metrics nobody exports: {sorted(missing)}"
    # The server's own names are not mistaken for the workers' (and the other way round).
    assert (
        not {n for n in read if n.startswith(("inferplane_stream_", "inferplane_batch_job"))}
        & exported
    )


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-prometheus-rule"]:
        sys.exit("usage: python -m tests.deploy.test_observability --write-prometheus-rule")
    PROMETHEUS_RULE.write_text(render_prometheus_rule())
