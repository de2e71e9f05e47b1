"""The chart's monitoring and logging objects: ServiceMonitor, PrometheusRule (SLO burn-rate alerts),
the Grafana dashboard ConfigMap, the gateway's metrics Service and the Fluent Bit DaemonSet. Core
objects validate strictly; the two Prometheus Operator kinds are checked here by structure, and every
metric any query uses must be one the code exports."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from api import metrics as api_metrics
from gateway import metrics as gateway_metrics
from tests.k8s.conftest import CRD_KINDS, validate_strict
from tests.k8s.helm import CHART, RELEASE_NS, ROOT, VALUES_MINIMAL, helm, render, template

VALUES_OBS = Path(__file__).with_name("values-observability.yaml")
VALUES_TEST = Path(__file__).with_name("values-test.yaml")


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
    done = helm("lint", "--strict", str(CHART), "-f", str(VALUES_MINIMAL), "-f", str(VALUES_OBS))
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
    for slo in ("Api", "Attach"):
        fast, slow = alerts[f"Orz{slo}ErrorBudgetBurnFast"], alerts[f"Orz{slo}ErrorBudgetBurnSlow"]
        assert fast["labels"]["severity"] == "page" and slow["labels"]["severity"] == "ticket"
        assert fast["annotations"]["summary"] and fast["annotations"]["description"]
    assert {"OrzApiDown", "OrzGatewayDown", "OrzSchedulerNoLeader", "OrzSchedulerJobFailing"} <= set(alerts)


def test_every_alert_links_its_runbook_when_a_runbook_base_url_is_set() -> None:
    """values.yaml promises runbookBaseUrl on each alert, and the launch checklist asks for runbooks for
    "API down" and "gateway down" too: a page without a link leaves the on-call person searching."""
    objs = render("-f", str(VALUES_OBS), "--set", "monitoring.prometheusRule.runbookBaseUrl=https://rb.example.com/orz/")
    (rule_obj,) = of_kind(objs, "PrometheusRule")
    alerts = {r["alert"]: r for g in rule_obj["spec"]["groups"] for r in g["rules"] if "alert" in r}
    urls = {name: rule["annotations"].get("runbook_url") for name, rule in alerts.items()}
    assert {"OrzApiDown", "OrzGatewayDown", "OrzSchedulerNoLeader", "OrzSchedulerJobFailing"} <= set(urls)
    assert all(url and re.fullmatch(r"https://rb\.example\.com/orz/[a-z-]+", url) for url in urls.values()), urls
    assert urls["OrzApiDown"].endswith("/api-down") and urls["OrzGatewayDown"].endswith("/gateway-down")


# -- the alert rules, evaluated by Prometheus's own rule engine (promtool test rules) -----------------
#
# Each case feeds series as the services export them (one sample a minute) to the rules exactly as helm
# renders them with values-observability.yaml (attach objective 0.99, API 0.9995), and says which alerts
# fire at a given time. Annotations are left out of the copy promtool evaluates (their text is not the
# behaviour; test_prometheus_rules_are_well_formed checks they are there).

PROMTOOL = ROOT / ".cache" / "bin" / "promtool"  # where hack/setup.sh puts it


def promtool() -> str:
    found = shutil.which("promtool") or (str(PROMTOOL) if PROMTOOL.exists() else None)
    if found is None:
        message = "promtool not found: run hack/setup.sh (it takes it from Debian's prometheus package)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def fires(*labels: dict[str, str]) -> list[dict[str, Any]]:
    return [{"exp_labels": dict(lab)} for lab in labels]


def attach(ok: str, error: str, rejected: str | None = None) -> list[dict[str, str]]:
    series = [{"series": 'orz_attaches_total{door="ssh",result="ok"}', "values": ok},
              {"series": 'orz_attaches_total{door="ssh",result="error"}', "values": error}]
    if rejected:
        series.append({"series": 'orz_attaches_total{door="ssh",result="rejected"}', "values": rejected})
    return series


def http(route: str, status: str, values: str) -> dict[str, str]:
    return {"series": f'orz_http_request_duration_seconds_count{{route="{route}",method="GET",status="{status}"}}',
            "values": values}


PAGE_ATTACH, TICKET_ATTACH = {"severity": "page", "slo": "attach"}, {"severity": "ticket", "slo": "attach"}
PAGE_API, TICKET_API = {"severity": "page", "slo": "api"}, {"severity": "ticket", "slo": "api"}

# name -> (input series, [(eval time, alert, expected firing alerts' labels)])
CASES: dict[str, tuple[list[dict[str, str]], list[tuple[str, str, list[dict[str, Any]]]]]] = {
    "one attach in five fails: page within minutes": (
        attach(ok="0+8x120", error="0+2x120"),
        [("15m", "OrzAttachErrorBudgetBurnFast", fires(PAGE_ATTACH))]),
    "half a percent of attaches fail: inside the 1% budget, silent for hours": (
        attach(ok="0+199x300", error="0+1x300"),
        [("4h", "OrzAttachErrorBudgetBurnFast", []), ("4h", "OrzAttachErrorBudgetBurnSlow", [])]),
    "five percent fail: a ticket, not a page": (
        attach(ok="0+95x300", error="0+5x300"),
        [("4h", "OrzAttachErrorBudgetBurnFast", []), ("4h", "OrzAttachErrorBudgetBurnSlow", fires(TICKET_ATTACH))]),
    "errors stopped half an hour ago: the page resolves": (
        attach(ok="0+8x120", error="0+2x60 120+0x60"),
        [("30m", "OrzAttachErrorBudgetBurnFast", fires(PAGE_ATTACH)),
         ("110m", "OrzAttachErrorBudgetBurnFast", [])]),
    "a burst of failures that ended half an hour ago: the short windows stop the page": (
        attach(ok="0x20 0+10x40", error="0+10x20 200x40"),
        [("15m", "OrzAttachErrorBudgetBurnFast", fires(PAGE_ATTACH)),
         ("55m", "OrzAttachErrorBudgetBurnFast", [])]),  # the 1h window alone is still far above 14.4x
    "refused attaches (not yours, bad token) do not spend the budget": (
        attach(ok="0+10x300", error="0x300", rejected="0+50x300"),
        [("4h", "OrzAttachErrorBudgetBurnFast", []), ("4h", "OrzAttachErrorBudgetBurnSlow", [])]),
    "one API request in a hundred fails: page": (
        [http("/v1/instances", "200", "0+990x60"), http("/v1/instances", "500", "0+10x60")],
        [("15m", "OrzApiErrorBudgetBurnFast", fires(PAGE_API))]),
    "failing probes and scrapes are not user requests": (
        [http("/v1/instances", "200", "0+100x300"), http("/healthz", "503", "0+50x300"),
         http("/readyz", "503", "0+50x300"), http("/metrics", "500", "0+50x300")],
        [("4h", "OrzApiErrorBudgetBurnFast", []), ("4h", "OrzApiErrorBudgetBurnSlow", [])]),
    "no leader for ten minutes": (
        [{"series": 'orz_scheduler_leader{pod="a"}', "values": "0x30"},
         {"series": 'orz_scheduler_leader{pod="b"}', "values": "0x30"}],
        [("5m", "OrzSchedulerNoLeader", []), ("15m", "OrzSchedulerNoLeader", fires({"severity": "ticket"}))]),
    "no scheduler reporting at all counts as no leader": (
        [http("/v1/instances", "200", "0+1x30")],
        [("15m", "OrzSchedulerNoLeader", fires({"severity": "ticket"}))]),
    "one replica leads": (
        [{"series": 'orz_scheduler_leader{pod="a"}', "values": "0x30"},
         {"series": 'orz_scheduler_leader{pod="b"}', "values": "1x30"}],
        [("15m", "OrzSchedulerNoLeader", [])]),
    "a job failing every minute": (
        [{"series": 'orz_scheduler_job_runs_total{task="reap_idle",result="error"}', "values": "0+1x40"},
         {"series": 'orz_scheduler_job_runs_total{task="purge",result="error"}', "values": "0x14 1x25"}],
        [("35m", "OrzSchedulerJobFailing", fires({"severity": "ticket", "task": "reap_idle"}))]),
    "a failing job on two scheduler replicas (scrape job and instance labels): one alert per task": (
        [{"series": 'orz_scheduler_job_runs_total{job="orz-scheduler",instance="a",task="reap_idle",'
                    'result="error"}', "values": "0+1x40"},
         {"series": 'orz_scheduler_job_runs_total{job="orz-scheduler",instance="b",task="reap_idle",'
                    'result="error"}', "values": "0+1x40"},
         {"series": 'orz_scheduler_job_runs_total{job="orz-scheduler",instance="a",task="purge",'
                    'result="error"}', "values": "0+1x40"}],
        [("35m", "OrzSchedulerJobFailing", fires({"severity": "ticket", "task": "purge"},
                                                 {"severity": "ticket", "task": "reap_idle"}))]),
}


def targets_cases(objs: list[dict[str, Any]]) -> dict[str, tuple[list[dict[str, str]], list[Any]]]:
    """The scrape-target alerts, with the job names the chart's own rules use."""
    (rule_obj,) = of_kind(objs, "PrometheusRule")
    exprs = {r["alert"]: r["expr"] for g in rule_obj["spec"]["groups"] for r in g["rules"] if "alert" in r}
    api_job = re.search(r'job="([^"]+)"', exprs["OrzApiDown"]).group(1)  # type: ignore[union-attr]
    gw_job = re.search(r'job="([^"]+)"', exprs["OrzGatewayDown"]).group(1)  # type: ignore[union-attr]
    return {
        "every API replica down": (
            [{"series": f'up{{job="{api_job}",instance="a"}}', "values": "0x20"},
             {"series": f'up{{job="{api_job}",instance="b"}}', "values": "0x20"}],
            [("3m", "OrzApiDown", []), ("10m", "OrzApiDown", fires({"severity": "page"}))]),
        "one API replica of two down": (
            [{"series": f'up{{job="{api_job}",instance="a"}}', "values": "0x20"},
             {"series": f'up{{job="{api_job}",instance="b"}}', "values": "1x20"}],
            [("10m", "OrzApiDown", [])]),
        "the gateway down while the API is up": (
            [{"series": f'up{{job="{gw_job}",instance="a"}}', "values": "0x20"},
             {"series": f'up{{job="{api_job}",instance="a"}}', "values": "1x20"}],
            [("10m", "OrzGatewayDown", fires({"severity": "page"})), ("10m", "OrzApiDown", [])]),
        # Targets that vanish from discovery leave no `up` series at all: absent() still fires.
        "every API target gone (no up series left)": (
            [{"series": f'up{{job="{api_job}",instance="a"}}', "values": "1x4 _x20"},
             {"series": f'up{{job="{gw_job}",instance="a"}}', "values": "1x25"}],
            [("3m", "OrzApiDown", []), ("15m", "OrzApiDown", fires({"severity": "page", "job": api_job})),
             ("15m", "OrzGatewayDown", [])]),
        "the gateway never discovered": (
            [{"series": f'up{{job="{api_job}",instance="a"}}', "values": "1x20"}],
            [("10m", "OrzGatewayDown", fires({"severity": "page", "job": gw_job})), ("10m", "OrzApiDown", [])]),
    }


def run_promtool(objs: list[dict[str, Any]], tmp: Path, series: list[dict[str, str]],
                 checks: list[tuple[str, str, list[dict[str, Any]]]]) -> subprocess.CompletedProcess[str]:
    (rule_obj,) = of_kind(objs, "PrometheusRule")
    groups = [{**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]}
              for g in rule_obj["spec"]["groups"]]
    (tmp / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    test = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": series,
        "alert_rule_test": [{"eval_time": t, "alertname": name, "exp_alerts": exp} for t, name, exp in checks],
    }]}
    (tmp / "test.yaml").write_text(yaml.safe_dump(test))
    return subprocess.run([promtool(), "test", "rules", "test.yaml"], cwd=tmp, capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.parametrize("case", sorted(CASES))
def test_alert_rules_fire_when_they_should(everything, tmp_path: Path, case: str) -> None:
    series, checks = CASES[case]
    done = run_promtool(everything, tmp_path, series, checks)
    assert done.returncode == 0, f"{case}:\n{done.stdout}{done.stderr}"


def test_target_down_alerts_fire_when_they_should(everything, tmp_path: Path) -> None:
    for case, (series, checks) in targets_cases(everything).items():
        done = run_promtool(everything, tmp_path, series, checks)
        assert done.returncode == 0, f"{case}:\n{done.stdout}{done.stderr}"


def test_promtool_notices_a_wrong_expectation(everything, tmp_path: Path) -> None:
    # The harness itself can fail: the same healthy series, claimed to page, is refused.
    series, _ = CASES["half a percent of attaches fail: inside the 1% budget, silent for hours"]
    done = run_promtool(everything, tmp_path, series, [("4h", "OrzAttachErrorBudgetBurnFast", fires(PAGE_ATTACH))])
    assert done.returncode != 0 and "OrzAttachErrorBudgetBurnFast" in done.stdout + done.stderr


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


def fluent_bit_sections(files: dict[str, str], name: str) -> list[tuple[str, dict[str, str]]]:
    """Fluent Bit's classic config read the way Fluent Bit reads it: [SECTION]s of `Key Value` lines,
    keys case-insensitive, `@INCLUDE file` resolved beside the file (here: the same ConfigMap)."""
    sections: list[tuple[str, dict[str, str]]] = []
    for raw in files[name].splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("@INCLUDE"):
            sections += fluent_bit_sections(files, line.split(None, 1)[1].strip())
        elif line.startswith("[") and line.endswith("]"):
            sections.append((line[1:-1].strip().upper(), {}))
        else:
            key, _, value = line.partition(" ")
            sections[-1][1][key.strip().lower()] = value.strip()
    return sections


def test_fluent_bit_ships_our_namespaces_logs_with_their_pod_metadata(everything) -> None:
    (ds,) = of_kind(everything, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    # The file the container reads is the one the chart renders.
    (config_arg,) = [a for a in c["args"] if a.startswith("--config=")]
    config_path = Path(config_arg.removeprefix("--config="))
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    (cm,) = [o for o in of_kind(everything, "ConfigMap") if o["metadata"]["name"] == volume["configMap"]["name"]]
    sections = fluent_bit_sections(cm["data"], config_path.name)
    (tail,) = [o for kind, o in sections if kind == "INPUT" and o["name"] == "tail"]
    filters = [o for kind, o in sections if kind == "FILTER" and o["name"] == "kubernetes"]
    outputs = [o for kind, o in sections if kind == "OUTPUT"]

    # Which of a node's container logs are tailed: kubelet names them <pod>_<namespace>_<container>-<id>.log.
    def tailed(namespace: str) -> bool:
        path = f"/var/log/containers/web-1_{namespace}_app-0123abcd.log"
        return any(fnmatch.fnmatchcase(path, glob) for glob in tail["path"].split(","))

    assert tailed(RELEASE_NS) and tailed("orz-sessions")
    assert not any(tailed(ns) for ns in ("kube-system", "default", f"{RELEASE_NS}-other", "x" + RELEASE_NS))
    # A tailed line's tag (the input's Tag with * = the file's path, slashes as dots) passes the
    # kubernetes filter, which finds the pod from what follows Kube_Tag_Prefix, and reaches an output.
    def tag_of(namespace: str) -> str:
        file_path = f"/var/log/containers/web-1_{namespace}_app-0123abcd.log"
        return tail["tag"].replace("*", file_path.lstrip("/").replace("/", "."))

    def filter_of(tag: str) -> dict[str, str]:
        """The one kubernetes filter a tag passes (Match is a glob, Match_Regex a regex searched from the start)."""
        (k8s,) = [f for f in filters if (fnmatch.fnmatchcase(tag, f["match"]) if "match" in f
                                         else re.match(f["match_regex"], tag))]
        return k8s

    for namespace in (RELEASE_NS, "orz-sessions"):
        tag, k8s = tag_of(namespace), filter_of(tag_of(namespace))
        assert tag.startswith(k8s["kube_tag_prefix"]) and tag.removeprefix(k8s["kube_tag_prefix"]).startswith("web-1_")
        assert any(fnmatch.fnmatchcase(tag, o["match"]) for o in outputs) and outputs[0]["name"] == "loki"
        # Every line's JSON keys become record fields.
        assert k8s["merge_log"].lower() == "on"
    # Our services' keys at the top; a session Pod's (its own code writes there) under session_log, so a
    # line it prints cannot pose as the gateway's `attached` event of another session.
    assert "merge_log_key" not in filter_of(tag_of(RELEASE_NS))
    assert filter_of(tag_of("orz-sessions"))["merge_log_key"] == "session_log"

    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/var/log"]["readOnly"] is True
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
    done = template(*bad)
    assert done.returncode != 0
    assert "schema" in done.stderr, done.stderr


def test_no_metric_has_a_label_prometheus_sets_on_every_target() -> None:
    """A label named `job` or `instance` comes out as exported_job/exported_instance, and queries grouping
    by it group by the scrape job instead: the scheduler's tasks are `task`."""
    for registry in (api_metrics.REGISTRY, gateway_metrics.REGISTRY):
        for collector in list(registry._collector_to_names):  # the metrics with no child yet too
            assert not {"job", "instance"} & set(getattr(collector, "_labelnames", ())), collector
    dash = (CHART / "dashboards" / "orzbob-cloud.json").read_text()
    rules = (CHART / "templates" / "monitoring" / "prometheusrule.yaml").read_text()
    for text in (dash, rules):
        assert "by (job" not in text and "by (le, job" not in text and "exported_job" not in text
    assert "sum by (task, result) (rate(orz_scheduler_job_runs_total" in dash


def test_every_exported_metric_is_in_the_observability_docs_table() -> None:
    """docs/observability.md is where an operator looks up a series they see on /metrics: none may be missing."""
    table = (ROOT / "docs" / "observability.md").read_text()
    documented = set(re.findall(r"^\| `(orz_[a-z_]+)`", table, flags=re.MULTILINE))
    exported = {family.name + ("_total" if family.type == "counter" else "")
                for registry in (api_metrics.REGISTRY, gateway_metrics.REGISTRY)
                for family in registry.collect() if family.name.startswith("orz_")}
    assert exported - documented == set()
