"""``services:`` of .orz/cloud.yaml reach the session's Pod: InstanceService with the KubernetesProvider
against the FAKE API server (tests/k8s/fake_apiserver.py), on SQLite and PostgreSQL.

The runner's part is played here with the runner's own code: its token comes from the session's
Secret, its spec from the Pod, and its report is ``runner.services.pod_sidecars`` over the file.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api import schemas
from api.auth import Principal
from api.db.models import Instance
from api.errors import Unauthorized
from api.instances.providers.kubernetes import names, sidecars
from api.instances.providers.kubernetes.provider import KubernetesProvider
from api.instances.service import InstanceService
from api.settings import Settings
from runner import cloud_config
from runner.services import pod_sidecars
from tests.api.lifecycle_support import HOST_KEY, principal
from tests.conftest import both_databases
from tests.k8s.conftest import NS, validate_strict
from tests.k8s.fake_apiserver import FakeApiServer

SECRET_VALUE = "pg-s3cret-value"
CLOUD_YAML = """\
version: "1.0"
services:
  db:
    image: postgres:16
    env: {POSTGRES_USER: app, POSTGRES_PASSWORD: "${PG_PASSWORD}"}
    ports: [5432]
    health: {command: pg_isready -U app, interval: 5s, timeout: 3s, retries: 10}
  cache:
    image: redis:7
    ports: [6379]
"""


class OneSecret:
    """The session's secrets: the bundle `db` gives PG_PASSWORD."""

    async def env_for(self, db: AsyncSession, org_id: str, user_id: str, names: Sequence[str]) -> dict[str, str]:
        return {"PG_PASSWORD": SECRET_VALUE} if "db" in names else {}


@pytest.fixture
async def service(settings: Settings, sessions: async_sessionmaker[AsyncSession],
                  provider: KubernetesProvider) -> AsyncIterator[InstanceService]:
    svc = InstanceService(settings, sessions, provider, secret_env=OneSecret(),
                          gateway_public_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGateway gateway")
    try:
        yield svc
    finally:
        await svc.wait_background()


@pytest.fixture
async def who(sessions: async_sessionmaker[AsyncSession]) -> Principal:
    return await principal(sessions, "acme")


def the_runner(server: FakeApiServer, sid: str) -> tuple[str, schemas.RunnerSpec]:
    """What the runner in the session's Pod is given: its token (from the Secret) and its spec."""
    secret = server.get("secrets", NS, names.secret_name(sid))
    pod = server.get("pods", NS, names.pod_name(sid))
    assert secret is not None and pod is not None
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    return (base64.b64decode(secret["data"]["ORZ_RUNNER_TOKEN"]).decode(),
            schemas.RunnerSpec.model_validate_json(env["ORZ_RUNNER_SPEC"]))


def runner_goes_on(spec: schemas.RunnerSpec, report: list[schemas.SidecarSpec]) -> bool:
    """The runner's own test (runner/main.py): does this Pod run the services the file names?"""
    return schemas.services_digest([s.model_dump(mode="json") for s in report]) == spec.pod_services_digest


def report_of(text: str) -> list[schemas.SidecarSpec]:
    return pod_sidecars(cloud_config.load(text))


def containers(server: FakeApiServer, sid: str) -> dict[str, dict[str, Any]]:
    pod = server.get("pods", NS, names.pod_name(sid))
    assert pod is not None
    return {c["name"]: c for c in pod["spec"]["containers"]}


async def row(service: InstanceService, sid: str) -> Instance:
    async with service.db_sessions() as db:
        inst = await db.get(Instance, sid)
        assert inst is not None
        return inst


def pods_created(server: FakeApiServer) -> list[dict[str, Any]]:
    return [obj for _, plural, kind, obj in server.cluster.events if plural == "pods" and kind == "ADDED"]


async def new_session(service: InstanceService, who: Principal) -> str:
    inst = await service.create(who, schemas.InstanceCreate(repo_url="https://example.com/acme/app.git",
                                                            branch="main", secrets=["db"]))
    return inst.id


@both_databases
async def test_services_reach_the_pod_with_one_restart_and_stay_across_stop_start(
        service: InstanceService, server: FakeApiServer, who: Principal) -> None:
    sid = await new_session(service, who)
    pvc = server.get("persistentvolumeclaims", NS, names.pvc_name(sid))
    assert pvc is not None
    assert list(containers(server, sid)) == ["runner"]
    token, spec = the_runner(server, sid)
    report = report_of(CLOUD_YAML)
    assert spec.sidecars == "pod" and not runner_goes_on(spec, report)

    reply = await service.record_heartbeat(sid, token, schemas.Heartbeat(init_status="pending", services=report))
    assert reply.state == "starting"
    await service.wait_background()

    # One restart: the same workspace volume, a new Pod with the sidecars and their probes.
    assert (server.count("DELETE", "pods"), server.count("POST", "pods")) == (1, 2)
    assert server.names("persistentvolumeclaims", NS) == [names.pvc_name(sid)]
    assert server.get("persistentvolumeclaims", NS, names.pvc_name(sid))["metadata"]["uid"] == pvc["metadata"]["uid"]
    side = containers(server, sid)
    assert list(side) == ["runner", "db", "cache"]
    assert side["db"]["image"] == "postgres:16" and side["cache"]["image"] == "redis:7"
    assert side["db"]["readinessProbe"]["exec"]["command"] == ["sh", "-c", "pg_isready -U app"]
    assert (side["db"]["readinessProbe"]["periodSeconds"], side["db"]["livenessProbe"]["failureThreshold"]) == (5, 10)
    assert {"name": "POSTGRES_PASSWORD", "valueFrom": {"secretKeyRef": {
        "name": names.secret_name(sid), "key": "PG_PASSWORD"}}} in side["db"]["env"]
    pod = server.get("pods", NS, names.pod_name(sid))
    assert pod["metadata"]["annotations"][names.GENERATION_ANNOTATION] == "2"
    new_token, new_spec = the_runner(server, sid)
    assert new_token != token and runner_goes_on(new_spec, report)
    inst = await row(service, sid)
    assert inst.state == "starting"  # until the new Pod's runner is up
    assert [s["name"] for s in inst.spec["services"]] == ["db", "cache"]
    events = await service.events(who, sid)
    assert any(e.kind == "sidecars" and e.message == "restarting the pod with the services of .orz/cloud.yaml: "
               "db, cache" for e in events)
    stored = json.dumps([inst.spec, [e.message for e in events], pods_created(server)])
    assert SECRET_VALUE not in stored and "${PG_PASSWORD}" in stored

    # The same report again restarts nothing: the old Pod's runner is refused, the new one is heeded.
    again = schemas.Heartbeat(init_status="pending", services=report)
    with pytest.raises(Unauthorized):
        await service.record_heartbeat(sid, token, again)
    assert (await service.record_heartbeat(sid, new_token, again)).state == "starting"
    await service.wait_background()
    assert server.count("POST", "pods") == 2

    # The kubelet gives the new Pod its address, which its runner reports (the API takes no other).
    server.set_pod_phase(NS, names.pod_name(sid), "Running", ip="10.244.0.7")
    up = schemas.Heartbeat(host_key=HOST_KEY, ssh_host="10.244.0.7", ssh_port=2222, init_status="succeeded",
                           program_running=True)
    assert (await service.record_heartbeat(sid, new_token, up)).state == "running"
    # A running session is never restarted by a report (a container restart in a Pod that ran).
    assert (await service.record_heartbeat(sid, new_token, schemas.Heartbeat(services=[]))).state == "running"
    await service.wait_background()
    assert server.count("POST", "pods") == 2

    # Stop/start: the Pod has the sidecars from its first start, so its runner goes straight on.
    await service.stop(who, sid)
    assert server.wait_for(lambda: server.get("pods", NS, names.pod_name(sid)) is None)  # after its grace period
    assert (await service.start(who, sid)).state == "starting"
    assert list(containers(server, sid)) == ["runner", "db", "cache"]
    assert runner_goes_on(the_runner(server, sid)[1], report)
    assert server.count("POST", "pods") == 3
    assert server.names("persistentvolumeclaims", NS) == [names.pvc_name(sid)]
    for created in pods_created(server):
        validate_strict(created)


def sidecar(name: str, **fields: Any) -> schemas.SidecarSpec:
    return schemas.SidecarSpec(name=name, image=fields.pop("image", "postgres:16"), **fields)


@pytest.mark.parametrize(("report", "reason"), [
    ([sidecar("db", ports=[2222])], ".orz/cloud.yaml: services.db.ports: 2222 is taken by another service or "
                                    "the runner"),
    ([sidecar("db", image="postgres 16")], ".orz/cloud.yaml: services.db.image: required, a container image"),
    ([sidecar("runner")], ".orz/cloud.yaml: services.runner: 'runner' is the session's own container"),
    ([sidecar("a", ports=[5432]), sidecar("b", ports=[5432])], ".orz/cloud.yaml: services.b.ports: 5432 is taken"),
    ([sidecar("db"), sidecar("db")], ".orz/cloud.yaml: services.db: services 'db' and 'db' both become"),
    ([sidecar("db", env={"X": "${NOPE}"})], ".orz/cloud.yaml: services.db.env.X: ${NOPE} is not one of this "
                                            "session's secrets"),
    ([sidecar("db", env={"X": "${ORZ_RUNNER_TOKEN}"})], ".orz/cloud.yaml: services.db.env.X: "
                                                        "${ORZ_RUNNER_TOKEN} is not one of this session's secrets"),
    # The node pulls sidecar images with its own credentials (a managed cluster's read the operator's private
    # registries) and from its own network (an internal registry): neither is any user's to run.
    ([sidecar("db", image="123456789012.dkr.ecr.us-east-1.amazonaws.com/internal/billing:1")],
     ".orz/cloud.yaml: services.db.image: 123456789012.dkr.ecr.us-east-1.amazonaws.com/internal/billing:1 is from "
     "123456789012.dkr.ecr.us-east-1.amazonaws.com, which sessions may not pull from here"),
    ([sidecar("db", image="10.0.0.5:5000/secret-tool")],
     ".orz/cloud.yaml: services.db.image: 10.0.0.5:5000/secret-tool is from 10.0.0.5:5000, which sessions"),
    ([sidecar("db", image="localhost/cached-private")], ".orz/cloud.yaml: services.db.image: localhost/cached"),
])
async def test_bad_services_fail_the_session_with_the_key_and_make_nothing(
        service: InstanceService, server: FakeApiServer, who: Principal,
        report: list[schemas.SidecarSpec], reason: str) -> None:
    sid = await new_session(service, who)
    token, _ = the_runner(server, sid)
    reply = await service.record_heartbeat(sid, token, schemas.Heartbeat(services=report))
    assert reply.state == "failed"
    await service.wait_background()
    inst = await row(service, sid)
    assert inst.reason is not None and inst.reason.startswith(reason), inst.reason
    assert "services" not in inst.spec
    # The Pod is released; nothing new was made; the workspace and the Secret stay, as for any failure.
    assert server.wait_for(lambda: server.get("pods", NS, names.pod_name(sid)) is None)  # after its grace period
    assert server.count("POST", "pods") == 1
    assert server.names("persistentvolumeclaims", NS) == [names.pvc_name(sid)]
    assert server.names("secrets", NS) == [names.secret_name(sid)]


@pytest.mark.parametrize(("plan", "allowed"), [("free", False), ("team", True)])
async def test_the_service_limit_is_the_plans_and_go_style_names_run_as_dns_labels(
        service: InstanceService, server: FakeApiServer, sessions: async_sessionmaker[AsyncSession],
        plan: str, allowed: bool) -> None:
    who = await principal(sessions, f"org-{plan}", plan=plan)
    sid = await new_session(service, who)
    token, spec = the_runner(server, sid)
    assert spec.max_services == (5 if plan == "free" else 16)
    report = [sidecar(f"Svc_{i}", env={"discovery.type": "single-node"}) for i in range(6)]
    reply = await service.record_heartbeat(sid, token, schemas.Heartbeat(services=report))
    await service.wait_background()
    inst = await row(service, sid)
    if not allowed:
        assert reply.state == "failed"
        assert inst.reason == ".orz/cloud.yaml: services: at most 5 are allowed on this plan, found 6"
        return
    assert reply.state == "starting" and inst.reason is None
    assert server.wait_for(lambda: server.count("POST", "pods") == 2)
    pod = server.get("pods", NS, names.pod_name(sid))
    assert pod is not None
    validate_strict(pod)
    sidecars = pod["spec"]["containers"][1:]
    assert [c["name"] for c in sidecars] == [f"svc-{i}" for i in range(6)]
    assert sidecars[0]["env"] == [{"name": "discovery.type", "value": "single-node"}]


@pytest.mark.parametrize(("image", "registry"), [
    ("postgres:16", "docker.io"), ("bitnami/redis:7", "docker.io"), ("docker.io/library/redis", "docker.io"),
    ("index.docker.io/library/redis", "docker.io"), ("ghcr.io/acme/tool@sha256:" + "0" * 64, "ghcr.io"),
    ("Quay.io/x/y", "quay.io"), ("registry.example.com:5000/x", "registry.example.com:5000"),
    ("localhost:5000/x", "localhost:5000"),
])
def test_the_registry_is_read_as_the_container_runtime_reads_it(image: str, registry: str) -> None:
    assert sidecars.image_registry(image) == registry
    allowed = registry in sidecars.DEFAULT_REGISTRIES
    try:
        sidecars.parse_services([{"name": "db", "image": image}])
    except sidecars.ServiceError as exc:
        assert not allowed and "may not pull from here" in str(exc)
    else:
        assert allowed
    sidecars.parse_services([{"name": "db", "image": image}], registries=("*",))  # an operator's "any"
