"""Shared helpers for the Kubernetes builder, provider and chart tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import kubernetes_validate
import pytest
from kubernetes import client as k8s

from api.instances.providers.base import ComputeSpec
from api.settings import Settings
from rehearsal.kinds import K8S_VERSION

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from api.instances.providers.kubernetes.provider import KubernetesProvider
    from api.instances.service import InstanceService
    from tests.k8s.fake_apiserver import FakeApiServer

# Custom resources of the Prometheus Operator are not in the Kubernetes schema that kubernetes-validate
# knows; these kinds alone skip it, and tests/k8s/test_observability.py checks them instead.
CRD_KINDS = frozenset({("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")})
# The sessions namespace of the provider tests against the fake API server.
NS = "orz-sessions"


def pod_route(provider: KubernetesProvider, session_id: str, state: Mapping[str, Any]) -> tuple[str, int] | None:
    """The pod's IP and the runner's SSH port, from the provider's watch once it has seen the pod (the gateway
    takes its route from the runner's heartbeat, which the API takes only when it names this address)."""
    from api.instances.providers.kubernetes import manifests, names
    from api.instances.providers.kubernetes.status import pod_ip

    ip = pod_ip(provider.cache.get(str(state.get("pod") or names.pod_name(session_id))))
    return (ip, manifests.RUNNER_SSH_PORT) if ip else None


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    """A fake Kubernetes API server (imported here: it imports this module for K8S_VERSION)."""
    from tests.k8s.fake_apiserver import FakeApiServer

    with FakeApiServer() as srv:
        yield srv


@pytest.fixture
async def provider(server: FakeApiServer) -> AsyncIterator[KubernetesProvider]:
    """The KubernetesProvider on the fake server (in tests/k8s it stands in for the FakeProvider)."""
    from api.instances.providers.kubernetes.provider import KubernetesProvider

    api = k8s.ApiClient(k8s.Configuration(host=server.url))
    # 10 s for a request: the fake server is a thread of this process, which on a loaded machine (the suite's
    # other workers) can take seconds to answer; test_timeouts_become_clear_reasons has its own short one.
    prov = KubernetesProvider(Settings(k8s_namespace=NS), api, request_timeout_s=10.0, watch_timeout_s=1,
                              sync_timeout_s=3.0, terminate_wait_s=1.0)
    try:
        yield prov
    finally:
        await prov.close()
        api.close()


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
    """Fail the test with the object's kind/name and the schema error if ``obj`` is invalid (an HTTPRoute
    against tests/k8s/gateway_api.py's schema: kubernetes-validate has no Gateway API schemas)."""
    if obj.get("apiVersion") == "gateway.networking.k8s.io/v1" and obj.get("kind") == "HTTPRoute":
        from tests.k8s.gateway_api import RouteInvalid, validate_httproute

        try:
            validate_httproute(obj)
        except RouteInvalid as exc:
            pytest.fail(f"HTTPRoute/{obj['metadata'].get('name')} does not validate: {exc}")
        return
    try:
        kubernetes_validate.validate(dict(obj), K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        name = obj.get("metadata", {}).get("name")
        pytest.fail(f"{obj.get('kind')}/{name} does not validate: {exc.message} at {list(exc.path)}")


@pytest.fixture
async def service(settings: Settings, sessions: async_sessionmaker[AsyncSession],
                  provider: KubernetesProvider) -> AsyncIterator[InstanceService]:
    """The API's InstanceService on the KubernetesProvider (a module may override it, e.g. with secrets)."""
    from api.instances.service import InstanceService

    svc = InstanceService(settings, sessions, provider,
                          gateway_public_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGateway gateway")
    try:
        yield svc
    finally:
        await svc.wait_background()
