"""The chart's `signin` values: the API gets every sign-in setting, its client secrets only as secretKeyRefs to
Secrets the operator made; the gateway only what its "Sign in with ..." links need; the scheduler nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.k8s.chart_pod import container_env, settings_from
from tests.k8s.conftest import CRD_KINDS, validate_strict
from tests.k8s.helm import CHART, VALUES_MINIMAL, helm, render, template

ISSUER = "https://sso.example.com/realms/acme"
# The Secrets an operator makes (kubectl create secret generic ...): name -> key -> value. They stand in for
# what the kubelet would read when it resolves the API container's secretKeyRefs.
OPERATOR_SECRETS = {"orz-oidc": {"secret": "oidc-s3cret"}, "orz-github": {"client-secret": "gh-s3cret"}}
SIGNIN = {
    "oidc": {"issuer": ISSUER, "clientId": "orz-cloud", "name": "Keycloak", "scopes": "openid email",
             "clientSecret": {"name": "orz-oidc", "key": "secret"}},
    "github": {"clientId": "Ov23li0123", "baseUrl": "https://github.example.com",
               "clientSecret": {"name": "orz-github"}},
    "newUsers": "create", "org": "acme", "allowedDomains": ["acme.com", "acme.co.uk"], "githubOrgs": ["acme"],
    "githubTeams": ["acme/platform"],
}
Objs = list[dict[str, Any]]


def values_file(tmp_path: Path, signin: dict[str, Any]) -> list[str]:
    path = tmp_path / "signin.yaml"
    path.write_text(json.dumps({"signin": signin}))  # JSON is YAML
    return ["-f", str(path)]


@pytest.fixture(scope="module")
def objs(tmp_path_factory: pytest.TempPathFactory) -> Objs:
    return render(*values_file(tmp_path_factory.mktemp("values"), SIGNIN))


def containers(objs: Objs, component: str) -> list[dict[str, Any]]:
    """Every container of the component's Deployment, init containers included."""
    (deploy,) = [o for o in objs if o["kind"] == "Deployment"
                 and o["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    pod = deploy["spec"]["template"]["spec"]
    return [*pod.get("initContainers", []), *pod["containers"]]


def env_of(objs: Objs, component: str) -> dict[str, dict[str, Any]]:
    (main,) = [c for c in containers(objs, component) if c["name"] == component]
    return {e["name"]: e for e in main["env"]}


def test_the_manifests_validate_and_lint(objs: Objs, tmp_path: Path) -> None:
    for obj in objs:
        if (obj["apiVersion"], obj["kind"]) not in CRD_KINDS:
            validate_strict(obj)
    done = helm("lint", "--strict", str(CHART), "-f", str(VALUES_MINIMAL), *values_file(tmp_path, SIGNIN))
    assert done.returncode == 0, done.stdout + done.stderr


def test_only_the_api_container_reads_the_client_secrets_from_their_secrets(objs: Objs) -> None:
    api = env_of(objs, "api")
    assert api["ORZ_OIDC_CLIENT_SECRET"] == {
        "name": "ORZ_OIDC_CLIENT_SECRET", "valueFrom": {"secretKeyRef": {"name": "orz-oidc", "key": "secret"}}}
    assert api["ORZ_GITHUB_CLIENT_SECRET"] == {
        "name": "ORZ_GITHUB_CLIENT_SECRET",
        "valueFrom": {"secretKeyRef": {"name": "orz-github", "key": "client-secret"}}}
    for component in ("gateway", "scheduler", "api"):
        for c in containers(objs, component):
            if component == "api" and c["name"] == "api":
                continue
            names = {e["name"] for e in c.get("env", [])}
            assert not {n for n in names if n.endswith("_CLIENT_SECRET")}, (component, c["name"])
            assert "envFrom" not in c, (component, c["name"])
    # The operator's Secrets are named nowhere else: no other Pod mounts them, no ConfigMap copies them.
    for obj in objs:
        is_api = obj["kind"] == "Deployment" and obj["metadata"]["labels"]["app.kubernetes.io/component"] == "api"
        text = json.dumps(obj)
        assert ("orz-oidc" in text and "orz-github" in text) == is_api, obj["metadata"]["name"]


def test_the_gateway_gets_the_issuer_client_ids_and_name_and_the_scheduler_nothing(objs: Objs) -> None:
    gateway = {name: e.get("value") for name, e in env_of(objs, "gateway").items()
               if name.startswith(("ORZ_OIDC_", "ORZ_GITHUB_", "ORZ_SIGNIN_"))}
    assert gateway == {"ORZ_OIDC_ISSUER": ISSUER, "ORZ_OIDC_CLIENT_ID": "orz-cloud", "ORZ_OIDC_NAME": "Keycloak",
                       "ORZ_GITHUB_CLIENT_ID": "Ov23li0123"}
    scheduler = [n for n in env_of(objs, "scheduler") if n.startswith(("ORZ_OIDC_", "ORZ_GITHUB_", "ORZ_SIGNIN_"))]
    assert scheduler == []


def test_each_component_s_settings_from_its_rendered_env(objs: Objs, tmp_path: Path) -> None:
    """Settings built from exactly the env each container gets: the gateway's pages link both providers, only
    the API holds the secrets and the rules."""
    from api.settings import Settings

    fields = {f"ORZ_{name.upper()}" for name in Settings.model_fields}
    settings = {}
    for component in ("api", "gateway", "scheduler"):
        env = container_env(objs, component, tmp_path / component, secrets=OPERATOR_SECRETS)
        assert set(env) <= fields | {"ORZ_DB_PASSWORD"}, component
        settings[component] = settings_from(env, data_dir=tmp_path / "data")
    api, gateway, scheduler = settings["api"], settings["gateway"], settings["scheduler"]
    assert gateway.signin_providers() == {"oidc": "Keycloak", "github": "GitHub"}
    assert api.signin_providers() == gateway.signin_providers()
    assert scheduler.signin_providers() == {}
    assert api.oidc_client_secret.get_secret_value() == "oidc-s3cret"
    assert api.github_client_secret.get_secret_value() == "gh-s3cret"
    for other in (gateway, scheduler):
        assert other.oidc_client_secret.get_secret_value() == other.github_client_secret.get_secret_value() == ""
    assert (api.oidc_issuer, api.oidc_client_id, api.oidc_scopes) == (ISSUER, "orz-cloud", "openid email")
    assert (api.github_base_url, api.github_api_url) == ("https://github.example.com",
                                                          "https://github.example.com/api/v3")
    assert (api.signin_new_users, api.signin_org) == ("create", "acme")
    assert api.signin_domains() == ("acme.com", "acme.co.uk")
    assert (api.signin_orgs(), api.signin_teams()) == (("acme",), ("acme/platform",))


def test_github_without_a_secret_gets_no_browser_link(tmp_path: Path) -> None:
    """GitHub's web flow needs the client secret: without one the API still does `orz cloud login`'s device
    flow, and the gateway's pages offer no GitHub link that could only fail."""
    objs = render(*values_file(tmp_path, {"github": {"clientId": "Ov23li0123"}}))
    api = settings_from(container_env(objs, "api", tmp_path / "api"), data_dir=tmp_path / "data")
    gateway = settings_from(container_env(objs, "gateway", tmp_path / "gw"), data_dir=tmp_path / "data")
    assert api.signin_providers() == {"github": "GitHub"}
    assert gateway.signin_providers() == {}


def test_by_default_no_component_gets_sign_in_settings(tmp_path: Path) -> None:
    objs = render()
    for component in ("api", "gateway", "scheduler"):
        env = container_env(objs, component, tmp_path / component)
        assert not [n for n in env if n.startswith(("ORZ_OIDC_", "ORZ_GITHUB_", "ORZ_SIGNIN_"))], component
        assert settings_from(env, data_dir=tmp_path / "data").signin_providers() == {}, component


@pytest.mark.parametrize(("args", "says"), [
    (["--set", "config.extraEnv.ORZ_OIDC_CLIENT_SECRET=s3cret"], "signin.oidc.clientSecret"),
    (["--set", "config.extraEnv.ORZ_GITHUB_CLIENT_SECRET=s3cret"], "signin.github.clientSecret"),
    (["--set", f"config.extraEnv.ORZ_OIDC_ISSUER={ISSUER}", "--set", f"signin.oidc.issuer={ISSUER}",
      "--set", "signin.oidc.clientId=orz"], "ORZ_OIDC_ISSUER is set both by config.extraEnv and by signin"),
    (["--set", f"signin.oidc.issuer={ISSUER}"], "signin.oidc.clientId"),
    (["--set", "signin.oidc.clientSecret.name=orz-oidc"], "signin.oidc: set issuer and clientId"),
    (["--set", "signin.github.clientSecret.name=orz-github"], "signin.github: set clientId"),
])
def test_misplaced_or_incomplete_settings_fail_the_render_by_name(args: list[str], says: str) -> None:
    done = template(*args)
    assert done.returncode != 0
    assert says in done.stderr, done.stderr
    assert "s3cret" not in done.stderr


@pytest.mark.parametrize("bad", [
    ["--set", "signin.oidc.clientSecret=s3cret"],  # a secret inline: the schema wants a Secret reference
    ["--set", "signin.github.clientSecret.value=s3cret"],
    ["--set", "signin.newUsers=always"],
    ["--set", "signin.oidc.issuer=sso.example.com"],
    ["--set", "signin.githubTeams={platform}"],
    ["--set", "signin.bogus=1"],
])
def test_schema_rejects_bad_sign_in_values(bad: list[str]) -> None:
    done = template(*bad)
    assert done.returncode != 0
    assert "schema" in done.stderr, done.stderr
