"""End to end against a real cluster (kind via hack/e2e-kind.sh, or any KUBECONFIG).

Opt-in: skipped unless KUBECONFIG or ORZ_E2E is set. Nothing here is kind-specific: it drives the
same KubernetesProvider the API uses, with the cluster's default StorageClass. Settings:
ORZ_E2E_RUNNER_IMAGE (default orzbob-cloud-runner:e2e, loaded into kind by the script),
ORZ_E2E_NAMESPACE (default: a fresh namespace, deleted afterwards), ORZ_E2E_API_URL (what runners
call; default the chart's in-cluster API Service), ORZ_E2E_TIMEOUT_S (default 240),
ORZ_E2E_SERVICE_IMAGE (the sidecar of the services test; default redis:7-alpine, pulled by the node).
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api import schemas
from api.instances.providers.base import ComputeSpec
from api.instances.providers.kubernetes import names
from api.instances.providers.kubernetes.provider import KubernetesProvider, default_api_client
from api.instances.service import InstanceService
from api.settings import Settings
from runner import cloud_config
from runner.services import pod_sidecars
from tests.api.lifecycle_support import principal
from tests.k8s.conftest import pod_route

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not (os.environ.get("KUBECONFIG") or os.environ.get("ORZ_E2E")),
        reason="needs a Kubernetes cluster: set KUBECONFIG or ORZ_E2E=1 (hack/e2e-kind.sh does both)",
    ),
]
TIMEOUT_S = float(os.environ.get("ORZ_E2E_TIMEOUT_S", "240"))
API_URL = os.environ.get("ORZ_E2E_API_URL", "http://orz-orzbob-cloud-api.orz-system.svc:8080")
GATEWAY_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE2eE2eE2eE2eE2eE2eE2eE2eE2eE2eE2eE2eE2e e2e"
# Small enough for a laptop's kind node.
SMALL = {"cpu": "500m", "memory": "512Mi"}


@pytest.fixture
async def namespace() -> AsyncIterator[str]:
    api = default_api_client()
    core = k8s.CoreV1Api(api)
    given = os.environ.get("ORZ_E2E_NAMESPACE")
    name = given or f"orz-e2e-{secrets.token_hex(3)}"
    if not given:
        await asyncio.to_thread(core.create_namespace, {"metadata": {"name": name}})
    try:
        yield name
    finally:
        if not given:
            await asyncio.to_thread(core.delete_namespace, name)
        api.close()


@pytest.fixture
async def provider(namespace: str) -> AsyncIterator[KubernetesProvider]:
    settings = Settings(
        k8s_namespace=namespace,
        k8s_runner_image=os.environ.get("ORZ_E2E_RUNNER_IMAGE", "orzbob-cloud-runner:e2e"),
        k8s_workspace_size="1Gi",
    )
    prov = KubernetesProvider(settings)
    try:
        yield prov
    finally:
        await prov.close()


def session_spec(session_id: str) -> ComputeSpec:
    return ComputeSpec(
        session_id=session_id, org_id="e2e-org", user_id="e2e-user", tier="small",
        resources=SMALL, repo_url=None, branch=None, program="bash", task=None, api_url=API_URL,
        gateway_public_key=GATEWAY_KEY,
        heartbeat_interval_s=20, runner_token=f"orzr_e2e_{secrets.token_urlsafe(16)}",
        secret_env={"E2E_SECRET": "value"},
    )


async def wait_for(what: str, check: Callable[[], Awaitable[bool]], timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(1)


async def test_session_lifecycle(provider: KubernetesProvider, namespace: str) -> None:
    sid = f"e2e-{secrets.token_hex(4)}"
    spec = session_spec(sid)
    core = k8s.CoreV1Api(provider._api)
    state = await provider.create(spec)
    pod_name = state["pod"]

    async def running() -> bool:
        # The pod must reach Running; whether the runner then stays up depends on the API it calls.
        pod = provider.cache.get(pod_name) or {}
        return pod.get("status", {}).get("phase") == "Running"

    async def pod_gone() -> bool:
        return provider.cache.get(pod_name) is None

    async def pvc_gone() -> bool:
        try:
            await asyncio.to_thread(core.read_namespaced_persistent_volume_claim, state["pvc"], namespace)
        except ApiException as exc:
            return exc.status == 404
        return False

    try:
        await wait_for("the session pod to run", running)
        assert pod_route(provider, sid, state) is not None

        state = await provider.stop(sid, state)
        await wait_for("the pod to go away", pod_gone)
        assert (await provider.status(sid, state)).phase == "stopped"
        pvc = await asyncio.to_thread(core.read_namespaced_persistent_volume_claim, state["pvc"], namespace)
        assert pvc.metadata.deletion_timestamp is None  # the workspace outlives the pod
        assert sid in await provider.list()

        state = await provider.start(spec, state)
        await wait_for("the session pod to run again", running)
    finally:
        await provider.delete(sid, state)
    await wait_for("the workspace to be deleted", pvc_gone)
    assert sid not in await provider.list()


CLOUD_YAML = f"""\
version: "1.0"
services:
  cache:
    image: {os.environ.get("ORZ_E2E_SERVICE_IMAGE", "redis:7-alpine")}
    ports: [6379]
    health: {{command: redis-cli ping, interval: 2s, timeout: 2s, retries: 30}}
"""


def ready_with(pod: dict[str, Any] | None, sidecar: str) -> bool:
    """The pod runs and its sidecar passed its readiness probe (health); a kubelet-less server has no statuses."""
    status = (pod or {}).get("status") or {}
    if status.get("phase") != "Running":
        return False
    statuses = status.get("containerStatuses")
    return statuses is None or any(cs.get("name") == sidecar and cs.get("ready") for cs in statuses)


async def test_session_whose_repo_has_a_service(provider: KubernetesProvider, namespace: str,
                                                settings: Settings, sessions: async_sessionmaker[AsyncSession],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The API learns the services from the runner's report (here played with the runner's own code over
    the repo's .orz/cloud.yaml), replaces the Pod once with the sidecar on the same workspace, and keeps
    it across stop/start."""
    monkeypatch.setitem(schemas.TIER_RESOURCES, "small", SMALL)
    service = InstanceService(settings.model_copy(update={"internal_api_url": API_URL}), sessions, provider,
                              gateway_public_key=GATEWAY_KEY)
    who = await principal(sessions, "e2e")
    core = k8s.CoreV1Api(provider._api)
    sid = (await service.create(who, schemas.InstanceCreate(program="bash"))).id
    pod_name, pvc_name = names.pod_name(sid), names.pvc_name(sid)

    async def pvc_uid() -> str:
        pvc = await asyncio.to_thread(core.read_namespaced_persistent_volume_claim, pvc_name, namespace)
        return str(pvc.metadata.uid)

    async def generation(number: int) -> bool:
        pod = provider.cache.get(pod_name) or {}
        annotations = pod.get("metadata", {}).get("annotations") or {}
        return annotations.get(names.GENERATION_ANNOTATION) == str(number) and ready_with(pod, "cache")

    try:
        workspace = await pvc_uid()
        secret = await asyncio.to_thread(core.read_namespaced_secret, names.secret_name(sid), namespace)
        token = base64.b64decode(secret.data["ORZ_RUNNER_TOKEN"]).decode()
        report = pod_sidecars(cloud_config.load(CLOUD_YAML))
        reply = await service.record_heartbeat(sid, token, schemas.Heartbeat(init_status="pending", services=report))
        assert reply.state == "starting"
        await service.wait_background()
        await wait_for("the pod with the sidecar to run and pass its health check", lambda: generation(2))
        pod = provider.cache.get(pod_name) or {}
        assert [c["name"] for c in pod["spec"]["containers"]] == ["runner", "cache"]
        assert await pvc_uid() == workspace

        await service.stop(who, sid)
        await wait_for("the pod to go away", lambda: _gone(provider, pod_name))
        await service.start(who, sid)
        await wait_for("the pod to run again with its sidecar", lambda: generation(3))
        assert await pvc_uid() == workspace
    finally:
        await service.delete(who, sid)
        await service.wait_background()


async def _gone(provider: KubernetesProvider, pod_name: str) -> bool:
    return provider.cache.get(pod_name) is None
