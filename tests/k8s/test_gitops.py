"""GitOps (Argo CD, Flux render with `helm template`, no `lookup`): with the keys given, two renders are
byte-identical, so a sync never rotates the CA, the JWT key, the secrets key or the database password."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from tests.k8s.chart_pod import rendered_secret
from tests.k8s.helm import gitops_keys_secret, gitops_values, render, template

VALUES_TEST = Path(__file__).with_name("values-test.yaml")


def twice(*args: str) -> tuple[str, str]:
    first, second = template(*args), template(*args)
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    return first.stdout, second.stdout


def test_without_keys_each_render_makes_new_ones() -> None:
    """Why GitOps needs the options below: `helm template` cannot see the live Secret."""
    first, second = twice()
    assert first != second


@pytest.mark.parametrize("values", [
    ["--set", "secrets.existingSecret=orz-keys"],
    ["--set", "secrets.existingSecret=orz-keys", "--set", "secrets.generate=false"],
    ["-f", str(VALUES_TEST)],
])
def test_existing_secret_renders_are_identical(values: list[str]) -> None:
    first, second = twice(*values)
    assert first == second
    assert "kind: Secret\n" not in first


def test_every_key_given_renders_identically_and_uses_them_verbatim(tmp_path: Path) -> None:
    secret = gitops_keys_secret()
    args = gitops_values(secret, tmp_path)
    first, second = twice(*args)
    assert first == second
    rendered = rendered_secret(render(*args))
    assert rendered == {k: base64.b64decode(v) for k, v in secret["data"].items()}


def test_the_script_s_secret_holds_every_key_the_chart_reads() -> None:
    secret = gitops_keys_secret("mine")
    generated = rendered_secret(render())
    assert set(secret["data"]) == set(generated)
    assert secret["metadata"]["name"] == "mine"


def test_generate_false_names_each_missing_value(tmp_path: Path) -> None:
    done = template("--set", "secrets.generate=false")
    assert done.returncode != 0
    assert "missing: gateway-client-key, gateway-host-key, gateway-public-key, jwt-key, jwt-public-key, " \
           "postgres-password, secrets-key, service-token, ssh-ca-key, ssh-ca-public-key" in done.stderr
    # One public half left out: named, since deriving it would make a new certificate on each render.
    secret = gitops_keys_secret()
    del secret["data"]["jwt-public-key"]
    done = template(*gitops_values(secret, tmp_path))
    assert done.returncode != 0
    assert "(missing: jwt-public-key)" in done.stderr


def test_generate_false_with_an_external_database_needs_no_postgres_password(tmp_path: Path) -> None:
    secret = gitops_keys_secret()
    del secret["data"]["postgres-password"]
    args = [*gitops_values(secret, tmp_path), "--set", "postgresql.enabled=false",
            "--set", "databaseUrlSecret.name=orz-database"]
    first, second = twice(*args)
    assert first == second
    assert "postgres-password" not in rendered_secret(render(*args))
