"""The chart's monitoring and logging objects: ServiceMonitor, PrometheusRule (SLO burn-rate alerts),
the Grafana dashboard ConfigMap, the gateway's metrics Service and the Fluent Bit DaemonSet. Core
objects validate strictly; the two Prometheus Operator kinds are checked here by structure, and every
metric any query uses must be one the code exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from api import metrics as api_metrics
from gateway import metrics as gateway_metrics
from tests.k8s.conftest import CRD_KINDS, validate_strict
from tests.k8s.helm import CHART, helm

VALUES_OBS = Path(__file__).with_name("values-observability.yaml")
VALUES_TEST = Path(__file__).with_name("values-test.yaml")
RELEASE_NS = "orz-system"


def render(*extra: str) -> list[dict[str, Any]]:
    done = helm("template", "orz", str(CHART), "--namespace", RELEASE_NS, *extra)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def of_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def exported_series() -> set[str]:
    """Every sample name the API and the gateway can export (counters with _total, histograms with
    _bucket/_sum/_count)."""
    names = set()
    for registry in (api_metrics.REGISTRY, gateway_metrics.REGISTRY):
        for family in registry.collect():
            if family.type == "counter":
                names.add(family.name + "_total")
            elif family.type == "histogram":
                names |= {family.name + s for s in ("_bucket", "_sum", "_count")}
            else:
                names.add(family.name)
    return names


def metrics_in(expr: str) -> set[str]:
    return set(re.findall(r"\borz_[a-z_]+\b", expr))


def parses(expr: str) -> bool:
    """True when ``expr`` is valid PromQL (Grafana's $__rate_interval read as a plain duration)."""
    try:
        promql_parser.parse(expr.replace("$__rate_interval", "5m"))
    except ValueError as exc:
        raise AssertionError(f"not PromQL: {expr}: {exc}") from None
    return True


@pytest.fixture(scope="module")
def everything() -> list[dict[str, Any]]:
    return render("-f", str(VALUES_OBS))


def test_lint_strict_with_everything_on() -> None:
    done = helm("lint", "--strict", str(CHART), "-f", str(VALUES_OBS))
    assert done.returncode == 0, done.stdout + done.stderr


def test_core_objects_validate_and_only_the_listed_crds_skip(everything) -> None:
    skipped = set()
    for obj in everything:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            skipped.add(obj["kind"])
            continue
        validate_strict(obj)
    assert skipped == {"ServiceMonitor", "PrometheusRule"}
    assert {"DaemonSet", "ConfigMap"} <= {o["kind"] for o in everything}


def test_defaults_have_the_dashboard_and_metrics_service_but_no_crds_or_daemonset() -> None:
    objs = render()
    kinds = {o["kind"] for o in objs}
    assert not kinds & {"ServiceMonitor", "PrometheusRule", "DaemonSet"}
    (dash,) = [o for o in of_kind(objs, "ConfigMap") if "orzbob-cloud.json" in o.get("data", {})]
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    names = {o["metadata"]["name"] for o in of_kind(objs, "Service")}
    assert "orz-orzbob-cloud-gateway-metrics" in names
    assert "orz-orzbob-cloud-scheduler-metrics" in names
    assert "orz-orzbob-cloud-api-metrics" in names
    off = render("--set", "monitoring.dashboard.enabled=false", "--set", "monitoring.gatewayMetricsPort=0",
                 "--set", "monitoring.schedulerMetricsPort=0", "--set", "monitoring.apiMetricsPort=0")
    assert not [o for o in of_kind(off, "ConfigMap") if "orzbob-cloud.json" in o.get("data", {})]
    assert not {"orz-orzbob-cloud-gateway-metrics", "orz-orzbob-cloud-scheduler-metrics",
                "orz-orzbob-cloud-api-metrics"} & {o["metadata"]["name"] for o in of_kind(off, "Service")}
    (api,) = [d for d in of_kind(off, "Deployment") if d["metadata"]["name"].endswith("-api")]
    assert "ORZ_API_METRICS_PORT" not in {e["name"] for e in api["spec"]["template"]["spec"]["containers"][0]["env"]}
    (policy,) = [o for o in of_kind(off, "NetworkPolicy") if o["metadata"]["name"].endswith("-scheduler")]
    assert "ingress" not in policy["spec"]  # no metrics port: nothing may connect at all


def test_gateway_metrics_stay_off_the_public_load_balancer(everything) -> None:
    services = {o["metadata"]["name"]: o for o in of_kind(everything, "Service")}
    public = services["orz-orzbob-cloud-gateway"]
    assert "metrics" not in {p["name"] for p in public["spec"]["ports"]}
    metrics_svc = services["orz-orzbob-cloud-gateway-metrics"]
    assert metrics_svc["spec"]["type"] == "ClusterIP"
    assert metrics_svc["spec"]["selector"] == public["spec"]["selector"]
    (deploy,) = [d for d in of_kind(everything, "Deployment") if d["metadata"]["name"] == "orz-orzbob-cloud-gateway"]
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "metrics", "containerPort": 9102, "protocol": "TCP"} in container["ports"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ORZ_GATEWAY_METRICS_PORT"] == "9102"


def test_api_metrics_stay_off_the_api_service_and_the_ingress(everything) -> None:
    services = {o["metadata"]["name"]: o for o in of_kind(everything, "Service")}
    public = services["orz-orzbob-cloud-api"]
    assert {p["name"] for p in public["spec"]["ports"]} == {"http"}
    metrics_svc = services["orz-orzbob-cloud-api-metrics"]
    assert metrics_svc["spec"]["type"] == "ClusterIP"
    assert metrics_svc["spec"]["selector"] == public["spec"]["selector"]
    assert metrics_svc["spec"]["ports"] == [{"name": "metrics", "port": 9101, "targetPort": "metrics",
                                             "protocol": "TCP"}]
    (deploy,) = [d for d in of_kind(everything, "Deployment") if d["metadata"]["name"] == "orz-orzbob-cloud-api"]
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "metrics", "containerPort": 9101, "protocol": "TCP"} in container["ports"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ORZ_API_METRICS_PORT"] == "9101"


def test_network_policy_limits_scrapers_to_the_monitoring_namespace() -> None:
    objs = render("-f", str(VALUES_TEST))
    policies = {o["metadata"]["name"]: o for o in of_kind(objs, "NetworkPolicy")}
    for name, port in (("orz-api", 9101), ("orz-gateway", 9102), ("orz-scheduler", 9103)):
        rule = next(r for r in policies[name]["spec"]["ingress"] if r["ports"] == [{"protocol": "TCP", "port": port}])
        assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]


def test_scheduler_serves_metrics_on_its_port(everything) -> None:
    (deploy,) = [d for d in of_kind(everything, "Deployment") if d["metadata"]["name"].endswith("-scheduler")]
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9103, "protocol": "TCP"}]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ORZ_SCHEDULER_METRICS_PORT"] == "9103" and env["ORZ_API_HOST"] == "0.0.0.0"


def test_service_monitor_scrapes_the_api_and_the_gateway_ports(everything) -> None:
    (sm,) = of_kind(everything, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    spec = sm["spec"]
    assert spec["namespaceSelector"] == {"matchNames": [RELEASE_NS]}
    selected = []
    for svc in of_kind(everything, "Service"):
        labels = svc["metadata"]["labels"]
        if all(labels.get(e["key"]) in e["values"] for e in spec["selector"]["matchExpressions"]):
            selected.append(svc)
    ports = {p["name"] for s in selected for p in s["spec"]["ports"]}
    assert {e["port"] for e in spec["endpoints"]} == {"metrics"} <= ports
    assert all(e["path"] == "/metrics" for e in spec["endpoints"])
    # Only the metrics Services: never the API's or the gateway's public Service, or PostgreSQL.
    assert {s["metadata"]["name"] for s in selected} == {
        "orz-orzbob-cloud-api-metrics", "orz-orzbob-cloud-gateway-metrics", "orz-orzbob-cloud-scheduler-metrics"}


def test_prometheus_rules_are_well_formed_multiwindow_burn_rate_alerts(everything) -> None:
    (rule_obj,) = of_kind(everything, "PrometheusRule")
    groups = rule_obj["spec"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    records = {r["record"] for r in rules if "record" in r}
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    known = exported_series()
    for r in rules:
        assert ("record" in r) != ("alert" in r), r
        assert parses(r["expr"])
        used = metrics_in(r["expr"])
        assert used <= known, used - known
        for recorded in re.findall(r"orz:[a-z_]+:ratio_rate\w+", r["expr"]):
            assert recorded in records, recorded
    for slo, objective in (("api", "0.9995"), ("attach", "0.99")):
        fast = alerts[f"Orz{slo.title()}ErrorBudgetBurnFast"]
        slow = alerts[f"Orz{slo.title()}ErrorBudgetBurnSlow"]
        assert fast["labels"]["severity"] == "page" and slow["labels"]["severity"] == "ticket"
        # Each alert pairs a long and a short window at the same burn factor.
        assert f"ratio_rate1h > (14.4 * (1 - {objective}))" in fast["expr"]
        assert f"ratio_rate5m > (14.4 * (1 - {objective}))" in fast["expr"]
        assert f"ratio_rate6h > (6 * (1 - {objective}))" in fast["expr"]
        assert f"ratio_rate30m > (6 * (1 - {objective}))" in fast["expr"]
        assert f"ratio_rate3d > (1 * (1 - {objective}))" in slow["expr"]
        assert fast["annotations"]["summary"] and fast["annotations"]["description"]
    attach_ratio = next(r for r in rules if r.get("record") == "orz:attach_errors:ratio_rate5m")
    assert 'orz_attaches_total{result="error"}' in attach_ratio["expr"]
    assert {"OrzApiDown", "OrzGatewayDown", "OrzSchedulerNoLeader", "OrzSchedulerJobFailing"} <= set(alerts)


def test_dashboard_queries_use_exported_metrics_and_cover_the_slos() -> None:
    dash = json.loads((CHART / "dashboards" / "orzbob-cloud.json").read_text())
    assert dash["uid"] == "orzbob-cloud"
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    titles = {p["title"] for p in panels}
    assert {"Sessions by state", "Attach success ratio", "Attach latency", "API error ratio"} <= titles
    known = exported_series()
    ids = set()
    for p in panels:
        assert p["id"] not in ids
        ids.add(p["id"])
        assert p["datasource"]["uid"] == "${datasource}"
        for t in p["targets"]:
            assert parses(t["expr"])
            assert metrics_in(t["expr"]) <= known, (p["title"], metrics_in(t["expr"]) - known)
    latency = next(p for p in panels if p["title"] == "p99 attach latency (1h)")
    assert "histogram_quantile(0.99" in latency["targets"][0]["expr"]
    # Panels do not overlap on Grafana's 24-column grid.
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, p["title"]
                cells.add((x, y))


def test_fluent_bit_tails_only_our_namespaces_with_namespaced_read_access(everything) -> None:
    (ds,) = of_kind(everything, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/var/log"]["readOnly"] is True
    (cm,) = [o for o in of_kind(everything, "ConfigMap") if o["metadata"]["name"] == "orz-orzbob-cloud-fluent-bit"]
    conf = cm["data"]["fluent-bit.conf"]
    assert "/var/log/containers/*_orz-system_*.log,/var/log/containers/*_orz-sessions_*.log" in conf
    assert "Merge_Log           On" in conf and "@INCLUDE outputs.conf" in conf
    assert "Name        loki" in cm["data"]["outputs.conf"]
    assert not of_kind(everything, "ClusterRole") and not of_kind(everything, "ClusterRoleBinding")
    roles = [r for r in of_kind(everything, "Role") if "fluent-bit" in r["metadata"]["name"]]
    assert {r["metadata"]["namespace"] for r in roles} == {"orz-system", "orz-sessions"}
    for role in roles:
        assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]


@pytest.mark.parametrize("bad", [
    ["--set", "monitoring.bogus=1"], ["--set", "monitoring.serviceMonitor.interval=often"],
    ["--set", "monitoring.prometheusRule.apiAvailabilityObjective=1.5"],
    ["--set", "logging.fluentBit.extra=1"], ["--set", "monitoring.gatewayMetricsPort=70000"],
])
def test_schema_rejects_unknown_keys_and_bad_values(bad: list[str]) -> None:
    done = helm("template", "orz", str(CHART), *bad)
    assert done.returncode != 0
    assert "schema" in done.stderr, done.stderr
