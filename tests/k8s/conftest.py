"""Shared helpers for the Kubernetes builder, provider and chart tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import kubernetes_validate
import pytest

from api.instances.providers.base import ComputeSpec

# The Kubernetes version every generated object must validate against (strict: unknown fields fail).
K8S_VERSION = "1.33.0"


def make_spec(
    session_id: str = "brave-otter-42",
    *,
    tier: str = "small",
    resources: Mapping[str, str] | None = None,
    secret_env: Mapping[str, str] | None = None,
    services: Sequence[Mapping[str, Any]] = (),
) -> ComputeSpec:
    return ComputeSpec(
        session_id=session_id,
        org_id="org-1",
        user_id="user-1",
        tier=tier,
        resources=dict(resources or {}),
        repo_url="https://example.com/acme/app.git",
        branch="main",
        program="claude",
        task="fix the tests",
        api_url="http://orz-api.orz-system.svc:8080",
        gateway_public_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGateway gateway",
        heartbeat_interval_s=20,
        runner_token="orzr_test_token_value_0123456789",
        secret_env=dict(secret_env or {}),
        services=services,
    )


def validate_strict(obj: Mapping[str, Any]) -> None:
    """Fail the test with the object's kind/name and the schema error if ``obj`` is invalid."""
    try:
        kubernetes_validate.validate(dict(obj), K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        name = obj.get("metadata", {}).get("name")
        pytest.fail(f"{obj.get('kind')}/{name} does not validate: {exc.message} at {list(exc.path)}")
