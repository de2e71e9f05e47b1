"""How users reach the API and the web door from outside: the Ingresses (TLS, cert-manager) and the
Gateway API HTTPRoutes, validated (kubernetes-validate; tests/k8s/gateway_api.py for HTTPRoutes) and
routed path by path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.k8s.conftest import validate_strict
from tests.k8s.gateway_api import RouteInvalid, route, validate_httproute
from tests.k8s.helm import render, template

VALUES_TEST = Path(__file__).with_name("values-test.yaml")
API_HOST, WEB_HOST = "api.orz.example.com", "attach.orz.example.com"
WEB_PATHS = ("/s/brave-otter-42", "/s/brave-otter-42/token", "/v1/instances/brave-otter-42/attach",
             "/v1/instances/brave-otter-42/ssh", "/static/xterm.js", "/healthz")
API_PATHS = ("/v1/instances", "/v1/me", "/healthz")
NEVER = ("/internal/v1/authorize", "/internal/v1/heartbeat", "/metrics", "/readyz")


def named(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (obj,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def ingress_backend(ingress: dict[str, Any], host: str, path: str) -> dict[str, Any] | None:
    """The backend an ingress controller picks for host+path (Exact, then the longest Prefix)."""
    best: tuple[int, dict[str, Any]] | None = None
    for rule in ingress["spec"]["rules"]:
        if rule.get("host", host) != host:
            continue
        for p in rule["http"]["paths"]:
            if p["pathType"] == "Exact" and path == p["path"]:
                return p["backend"]["service"]
            prefix = p["path"].rstrip("/")
            matches = p["pathType"] == "Prefix" and (path == prefix or path.startswith(prefix + "/"))
            if matches and (best is None or len(prefix) > best[0]):
                best = (len(prefix), p["backend"]["service"])
    return best[1] if best else None


@pytest.fixture(scope="module")
def objs() -> list[dict[str, Any]]:
    return render("-f", str(VALUES_TEST))


def test_web_door_ingress_reaches_the_gateways_web_port_on_its_own_host(objs: list[dict[str, Any]]) -> None:
    web = named(objs, "Ingress", "orz-web")
    validate_strict(web)
    gw_svc = named(objs, "Service", "orz-gateway")
    (gw_port,) = [p for p in gw_svc["spec"]["ports"] if p["name"] == "web"]
    gw_deploy = named(objs, "Deployment", "orz-gateway")
    container_ports = {p["name"]: p["containerPort"] for p in
                       gw_deploy["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert container_ports[gw_port["targetPort"]] == 8443  # gateway.webPort
    for path in WEB_PATHS:
        assert ingress_backend(web, WEB_HOST, path) == {"name": "orz-gateway", "port": {"name": "web"}}, path
        assert ingress_backend(web, API_HOST, path) is None, path
    # The API's Ingress keeps its own host: the web door's /v1/... never lands on the API.
    api = named(objs, "Ingress", "orz-api")
    assert ingress_backend(api, WEB_HOST, "/v1/instances/brave-otter-42/attach") is None
    # WebSockets stay open: ingress-nginx's 60 s idle timeout is raised on this Ingress only.
    assert web["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "3600"
    assert "nginx.ingress.kubernetes.io/proxy-read-timeout" not in api["metadata"]["annotations"]


def test_cert_manager_annotates_both_and_fills_the_tls_not_given(objs: list[dict[str, Any]]) -> None:
    api, web = named(objs, "Ingress", "orz-api"), named(objs, "Ingress", "orz-web")
    for ingress in (api, web):
        assert ingress["metadata"]["annotations"]["cert-manager.io/cluster-issuer"] == "letsencrypt"
    assert api["spec"]["tls"] == [{"secretName": "orz-api-tls", "hosts": [API_HOST]}]  # given: kept
    assert web["spec"]["tls"] == [{"secretName": "orz-web-tls", "hosts": [WEB_HOST]}]  # made for cert-manager
    issuer = render("--set", "ingress.enabled=true", "--set", f"ingress.hosts={{{API_HOST}}}",
                    "--set", "ingress.certManager.issuer=local-ca")
    api = named(issuer, "Ingress", "orz-orzbob-cloud-api")
    validate_strict(api)
    assert api["metadata"]["annotations"] == {"cert-manager.io/issuer": "local-ca"}
    assert api["spec"]["tls"] == [{"secretName": "orz-orzbob-cloud-api-tls", "hosts": [API_HOST]}]


def test_no_tls_without_cert_manager_or_tls_values() -> None:
    objs = render("--set", "ingress.enabled=true", "--set", "ingress.web.enabled=true",
                  "--set", f"ingress.web.hosts={{{WEB_HOST}}}")
    web = named(objs, "Ingress", "orz-orzbob-cloud-web")
    validate_strict(web)
    assert "tls" not in web["spec"]
    assert "annotations" not in named(objs, "Ingress", "orz-orzbob-cloud-api")["metadata"]


@pytest.mark.parametrize(("values", "message"), [
    (["--set", "ingress.web.enabled=true"], "set ingress.web.hosts"),
    (["--set", "ingress.enabled=true", "--set", "ingress.certManager.clusterIssuer=x"], "set ingress.hosts"),
    (["--set", "gatewayApi.enabled=true"], "set gatewayApi.parentRefs"),
    (["--set", "gatewayApi.enabled=true", "--set", "gatewayApi.parentRefs[0].name=gw",
      "--set", "gatewayApi.web.enabled=true"], "set gatewayApi.web.hostnames"),
    (["--set", "ingress.certManager.clusterIssuer=a", "--set", "ingress.certManager.issuer=b"], "certManager"),
    (["--set", "gatewayApi.apiHostnames={Not_A_Host}"], "apiHostnames"),
])
def test_incomplete_edge_values_fail_with_what_to_set(values: list[str], message: str) -> None:
    done = template(*values)
    assert done.returncode != 0
    assert message in done.stderr


def test_httproutes_validate_and_route_public_paths_only(objs: list[dict[str, Any]]) -> None:
    routes = [o for o in objs if o["kind"] == "HTTPRoute"]
    assert {r["metadata"]["name"] for r in routes} == {"orz-api", "orz-web"}
    for r in routes:
        validate_strict(r)
        assert r["spec"]["parentRefs"] == [{"name": "public", "namespace": "gateway-system", "sectionName": "https"}]
    api_svc = named(objs, "Service", "orz-api")
    api_target = ("orz-api", api_svc["spec"]["ports"][0]["port"])
    for path in API_PATHS:
        assert route(routes, API_HOST, path) == api_target, path
    for path in NEVER:
        assert route(routes, API_HOST, path) is None, path
    gw_svc = named(objs, "Service", "orz-gateway")
    (web_port,) = [p["port"] for p in gw_svc["spec"]["ports"] if p["name"] == "web"]
    for path in WEB_PATHS:
        assert route(routes, WEB_HOST, path) == ("orz-gateway", web_port), path


def test_httproute_off_by_default_and_api_only_without_web() -> None:
    assert not [o for o in render() if o["kind"] == "HTTPRoute"]
    routes = [o for o in render("--set", "gatewayApi.enabled=true", "--set", "gatewayApi.parentRefs[0].name=gw")
              if o["kind"] == "HTTPRoute"]
    (api,) = routes
    validate_strict(api)
    assert "hostnames" not in api["spec"]  # the listener's host names
    assert route(routes, "anything.example.com", "/v1/instances") == ("orz-orzbob-cloud-api", 8080)
    assert route(routes, "anything.example.com", "/internal/v1/authorize") is None


@pytest.mark.parametrize(("change", "why"), [
    (lambda r: r["spec"]["rules"][0]["matches"][0]["path"].update(value="v1"), "absolute path"),
    (lambda r: r["spec"]["rules"][0]["backendRefs"][0].pop("port"), "port"),
    (lambda r: r["spec"]["rules"][0].update(backendRef=[]), "Additional properties"),
    (lambda r: r["spec"]["rules"][0]["matches"][0]["path"].update(type="Prefix"), "is not one of"),
    (lambda r: r["spec"].update(hostnames=["API.example.com"]), "does not match"),
])
def test_the_httproute_schema_refuses_what_an_api_server_would(objs: list[dict[str, Any]], change: Any,
                                                                 why: str) -> None:
    import copy

    bad = copy.deepcopy(named(objs, "HTTPRoute", "orz-api"))
    change(bad)
    with pytest.raises(RouteInvalid, match=why):
        validate_httproute(bad)
