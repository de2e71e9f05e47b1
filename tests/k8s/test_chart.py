"""The Helm chart lints strictly, renders, and every rendered object validates (kubernetes-validate)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.k8s.conftest import CRD_KINDS, validate_strict
from tests.k8s.helm import CHART, RELEASE_NS, VALUES_MINIMAL, helm, render, template

VALUES_TEST = Path(__file__).with_name("values-test.yaml")
VALUES_KIND = CHART.parents[1] / "hack" / "kind-values.yaml"
VALUE_SETS = {"default": [], "values-test": ["-f", str(VALUES_TEST)], "kind": ["-f", str(VALUES_KIND)]}


@pytest.fixture(scope="module", params=list(VALUE_SETS))
def rendered(request: pytest.FixtureRequest) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    yield request.param, render(*VALUE_SETS[request.param])


def by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def component(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (obj,) = [o for o in objs if o["kind"] == kind
              and o["metadata"]["labels"]["app.kubernetes.io/component"] == name]
    return obj


@pytest.mark.parametrize("values", list(VALUE_SETS))
def test_helm_lint_strict(values: str) -> None:
    done = helm("lint", "--strict", str(CHART), "-f", str(VALUES_MINIMAL), *VALUE_SETS[values])
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_rendered_object_validates(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objs = rendered
    assert len(objs) >= 15
    for obj in objs:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue
        validate_strict(obj)


def test_replicas_and_disruption_budgets(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objs = rendered
    for name in ("api", "gateway"):
        deploy = component(objs, "Deployment", name)
        assert deploy["spec"]["replicas"] >= 2
        pdb = component(objs, "PodDisruptionBudget", name)
        assert pdb["spec"]["selector"]["matchLabels"].items() <= \
            deploy["spec"]["template"]["metadata"]["labels"].items()
    component(objs, "Deployment", "scheduler")


def test_gateway_service_is_a_load_balancer_on_22(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, objs = rendered
    svc = component(objs, "Service", "gateway")
    # kind has no load balancer controller: its values use a NodePort.
    assert svc["spec"]["type"] == ("NodePort" if name == "kind" else "LoadBalancer")
    ssh = next(p for p in svc["spec"]["ports"] if p["name"] == "ssh")
    assert ssh["port"] == 22 and ssh["targetPort"] == "ssh"
    container = component(objs, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "ssh", "containerPort": 2222, "protocol": "TCP"} in container["ports"]


def test_pods_are_locked_down(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objs = rendered
    for obj in objs:
        if obj["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        pod = obj["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        # Only the pods that drive the Kubernetes provider get a service-account token.
        wants_token = obj["metadata"]["labels"]["app.kubernetes.io/component"] in ("api", "scheduler")
        assert pod["automountServiceAccountToken"] is wants_token, obj["metadata"]["name"]
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["requests"], c["name"]


def test_probes_on_healthz_and_readyz(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objs = rendered
    for name in ("api", "gateway"):
        c = component(objs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_env_names_are_settings_fields(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    from api.settings import Settings

    fields = {f"ORZ_{name.upper()}" for name in Settings.model_fields}
    _, objs = rendered
    for obj in objs:
        if obj["kind"] not in ("Deployment", "Job"):
            continue
        for c in obj["spec"]["template"]["spec"]["containers"]:
            for env in c.get("env", []):
                # ORZ_DB_PASSWORD only feeds $(ORZ_DB_PASSWORD) in ORZ_DATABASE_URL.
                assert env["name"] in fields | {"ORZ_DB_PASSWORD"}, env["name"]


def test_rbac_is_limited_to_the_sessions_namespace(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, objs = rendered
    sessions_ns = "agents" if name == "values-test" else "orz-sessions"
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    (role,) = by_kind(objs, "Role").values()
    (binding,) = by_kind(objs, "RoleBinding").values()
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == sessions_ns
    allowed = {"pods", "pods/log", "configmaps", "secrets", "persistentvolumeclaims", "networkpolicies"}
    for rule in role["rules"]:
        assert set(rule["resources"]) <= allowed
        assert "*" not in rule["verbs"] and "escalate" not in rule["verbs"]
    subjects = {s["name"] for s in binding["subjects"]}
    accounts = {component(objs, "ServiceAccount", c)["metadata"]["name"] for c in ("api", "scheduler")}
    assert subjects == accounts


def test_no_hooks_migrations_are_the_api_pods_init_container(rendered: Rendered) -> None:
    _, objs = rendered
    assert not by_kind(objs, "Job")
    assert not [o for o in objs if "helm.sh/hook" in o["metadata"].get("annotations", {})]
    pod = component(objs, "Deployment", "api")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["migrate"]
    off = render("--set", "migrations.enabled=false")
    assert "initContainers" not in component(off, "Deployment", "api")["spec"]["template"]["spec"]


@pytest.mark.postgres
@pytest.mark.parametrize("empty_database_url", ["postgres"], indirect=True)
def test_two_api_pods_migrate_at_once_then_start(empty_database_url: str, tmp_path: Path) -> None:
    """The rendered init container's command and env, run twice at once as two API Pods would."""
    import asyncio
    import subprocess
    import sys

    from api.db import migrate
    from tests.k8s.chart_pod import container_env, settings_from
    from tests.support import orz_env

    objs = render("--set", f"databaseUrl={empty_database_url}")
    pod = component(objs, "Deployment", "api")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    procs = []
    for i in range(2):
        env = container_env(objs, "api", tmp_path / f"pod{i}", container="migrate")
        env["ORZ_DATA_DIR"] = str(tmp_path / f"pod{i}" / "data")
        procs.append(subprocess.Popen([sys.executable, "-m", "cli", *init["args"]], text=True,
                                      env=orz_env(tmp_path / f"pod{i}", **env), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE))
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert f"database at revision {migrate.head_revision(empty_database_url)}" in out
    api = settings_from(container_env(objs, "api", tmp_path / "api"), data_dir=tmp_path / "data")
    asyncio.run(migrate.ensure_at_head(api.database_url))


def test_bundled_postgres_vs_external_database() -> None:
    default = render()
    assert component(default, "StatefulSet", "postgresql")
    env = component(default, "Deployment", "api")["spec"]["template"]["spec"]["containers"][0]["env"]
    url = next(e for e in env if e["name"] == "ORZ_DATABASE_URL")
    assert url["value"].startswith("postgresql+asyncpg://orz:$(ORZ_DB_PASSWORD)@")
    external = render("-f", str(VALUES_TEST))
    assert not by_kind(external, "StatefulSet")
    env = component(external, "Deployment", "api")["spec"]["template"]["spec"]["containers"][0]["env"]
    url = next(e for e in env if e["name"] == "ORZ_DATABASE_URL")
    assert url["valueFrom"]["secretKeyRef"] == {"name": "orz-database", "key": "url"}
    inline = render("--set", "databaseUrl=postgresql+asyncpg://u:p@db:5432/orz")
    assert not by_kind(inline, "StatefulSet")


def test_existing_secret_replaces_the_generated_one() -> None:
    assert by_kind(render(), "Secret")
    objs = render("-f", str(VALUES_TEST))
    assert not by_kind(objs, "Secret")
    volumes = component(objs, "Deployment", "api")["spec"]["template"]["spec"]["volumes"]
    keys = next(v for v in volumes if v["name"] == "keys")
    assert keys["secret"]["secretName"] == "orz-keys"


def test_network_policies(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, objs = rendered
    policies = {o["metadata"]["labels"]["app.kubernetes.io/component"]: o for o in objs
                if o["kind"] == "NetworkPolicy"}
    assert {"api", "gateway", "scheduler"} <= set(policies)
    # Nothing may connect but a scraper to the metrics port.
    assert [r["ports"] for r in policies["scheduler"]["spec"].get("ingress", [])] in (
        [], [[{"protocol": "TCP", "port": 9103}]])
    if name == "default":
        (rule,) = policies["postgresql"]["spec"]["ingress"]
        assert rule["ports"] == [{"protocol": "TCP", "port": 5432}]


Rendered = tuple[str, list[dict[str, Any]]]


def test_gateway_selector_setting_matches_the_gateway_pods(rendered: Rendered) -> None:
    _, objs = rendered
    gateway = component(objs, "Deployment", "gateway")
    env = {e["name"]: e.get("value") for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    wanted = dict(term.split("=", 1) for term in env["ORZ_K8S_GATEWAY_SELECTOR"].split(","))
    assert wanted.items() <= gateway["spec"]["template"]["metadata"]["labels"].items()
    assert env["ORZ_K8S_GATEWAY_NAMESPACE_SELECTOR"] == f"kubernetes.io/metadata.name={RELEASE_NS}"


@pytest.mark.parametrize("drain", [None, (0, 20), (10, 600)])
def test_gateway_drain_fits_in_the_grace_period(drain: tuple[int, int] | None) -> None:
    """The kubelet's grace period covers the preStop sleep, the gateway's drain and its close."""
    values = [] if drain is None else ["--set", f"gateway.drain.preStopSeconds={drain[0]}",
                                       "--set", f"gateway.drain.drainSeconds={drain[1]}"]
    pod = component(render(*values), "Deployment", "gateway")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    drain_s = float(env["ORZ_GATEWAY_DRAIN_S"])
    hook = container.get("lifecycle", {}).get("preStop")
    pre_stop_s = 0 if hook is None else int(hook["exec"]["command"][-1].split("sleep(")[1].rstrip(")"))
    assert (pre_stop_s, drain_s) == ((5, 240) if drain is None else drain)
    assert pod["terminationGracePeriodSeconds"] >= pre_stop_s + drain_s + 20


@pytest.mark.parametrize("bad", [
    ["--set", "gateway.drain.drainSeconds=-1"], ["--set", "gateway.drain.preStopSeconds=600"],
    ["--set", "bogus=1"], ["--set", "api.bogus=1"], ["--set", "api.replicas=1"],
    ["--set", "gateway.service.extra=1"], ["--set", "sessions.namespace=Bad_NS"],
])
def test_schema_rejects_unknown_keys_and_bad_values(bad: list[str]) -> None:
    done = template(*bad)
    assert done.returncode != 0
    assert "schema" in done.stderr, done.stderr


def test_no_database_configured_fails_clearly() -> None:
    done = template("--set", "postgresql.enabled=false")
    assert done.returncode != 0
    assert "databaseUrl" in done.stderr


@pytest.mark.parametrize("values", [[], ["--set", "config.publicSshHost="], ["--set", "config.publicSshHost=a b"]])
def test_public_ssh_host_is_required(values: list[str]) -> None:
    done = helm("template", "orz", str(CHART), *values)
    assert done.returncode != 0
    assert "/config/publicSshHost" in done.stderr, done.stderr


@pytest.mark.parametrize("port", [22, 2200])
def test_notes_show_the_ssh_line_the_api_gives_users(port: int, tmp_path: Path) -> None:
    from api.instances.views import ssh_command
    from tests.k8s.chart_pod import container_env, settings_from

    values = ["-f", str(VALUES_MINIMAL), "--set", f"config.publicSshPort={port}"]
    done = helm("install", "orz", str(CHART), "--namespace", RELEASE_NS, "--dry-run=client", *values)
    assert done.returncode == 0, done.stderr
    notes = done.stdout.split("NOTES:", 1)[1]
    objs = render("--set", f"config.publicSshPort={port}")
    api = settings_from(container_env(objs, "api", tmp_path), data_dir=tmp_path / "data")
    assert f"  {ssh_command(api, '<session-id>')}\n" in notes
    assert api.public_ssh_host == "ssh.orz.example.com"


def _ingress_route(ingress: dict[str, Any], host: str, path: str) -> tuple[str, int] | None:
    """Where an ingress controller sends host+path under these rules (Exact, then longest Prefix)."""
    best: tuple[int, tuple[str, int]] | None = None
    for rule in ingress["spec"]["rules"]:
        if rule.get("host", host) != host:
            continue
        for p in rule["http"]["paths"]:
            backend = p["backend"]["service"]
            target = (backend["name"], backend["port"]["number"])
            if p["pathType"] == "Exact" and path == p["path"]:
                return target
            prefix = p["path"].rstrip("/")
            matches = p["pathType"] == "Prefix" and (path == prefix or path.startswith(prefix + "/"))
            if matches and (best is None or len(prefix) > best[0]):
                best = (len(prefix), target)
    return best[1] if best else None


def test_ingress_routes_public_paths_never_internal() -> None:
    assert not by_kind(render(), "Ingress")  # off by default
    objs = render("-f", str(VALUES_TEST))
    ingress = by_kind(objs, "Ingress")["orz-api"]  # beside it, the web door's (tests/k8s/test_edge.py)
    validate_strict(ingress)
    api_svc = component(objs, "Service", "api")
    target = (api_svc["metadata"]["name"], api_svc["spec"]["ports"][0]["port"])
    for path in ("/v1/instances", "/v1/instances/x/attach", "/v1/me", "/healthz"):
        assert _ingress_route(ingress, "api.orz.example.com", path) == target, path
    for path in ("/internal/v1/authorize", "/internal/v1/heartbeat", "/metrics", "/readyz", "/v1x"):
        assert _ingress_route(ingress, "api.orz.example.com", path) is None, path
    assert ingress["spec"]["tls"] == [{"secretName": "orz-api-tls", "hosts": ["api.orz.example.com"]}]


@pytest.mark.parametrize("values", ["default", "values-test"])
def test_internal_traffic_uses_the_in_cluster_api_service(values: str, tmp_path: Path) -> None:
    from tests.k8s.chart_pod import container_env, settings_from

    objs = render(*VALUE_SETS[values])
    api_svc = component(objs, "Service", "api")
    in_cluster = f"http://{api_svc['metadata']['name']}.{RELEASE_NS}.svc:{api_svc['spec']['ports'][0]['port']}"
    public = "https://api.orz.example.com" if values == "values-test" else None
    for name in ("api", "gateway", "scheduler"):
        settings = settings_from(container_env(objs, name, tmp_path / name), data_dir=tmp_path / "data")
        assert settings.internal_api_url == in_cluster, name
        if public:
            assert settings.public_api_url == public, name
        else:
            assert settings.public_api_url != in_cluster, name



def _install_notes(*values: str) -> str:
    done = helm("install", "orz", str(CHART), "--namespace", RELEASE_NS, "--dry-run=client", "-f",
                str(VALUES_MINIMAL), *values)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("NOTES:", 1)[1]


def test_notes_warn_when_the_api_is_behind_the_charts_proxy_with_no_trusted_proxies() -> None:
    """Behind the Ingress, unlisted, the controller is capped as one client: random users get 429."""
    warning = "ORZ_API_TRUSTED_PROXIES is not\nset"
    assert warning not in _install_notes()
    notes = _install_notes("--set", "ingress.enabled=true")
    assert warning in notes and "ORZ_API_CONNECTIONS_PER_ADDRESS, 256 per API process" in notes
    assert warning not in _install_notes("--set", "ingress.enabled=true",
                                         "--set-string", "config.extraEnv.ORZ_API_TRUSTED_PROXIES=10.0.0.0/8")
