"""Recordings on Kubernetes: InstanceService with the KubernetesProvider against the FAKE API server
(tests/k8s/fake_apiserver.py), on SQLite and PostgreSQL.

The runner in the session's Pod is told to record (its spec in the Pod carries the cap, as the local
provider's runners are told), and what it uploads with the token from the session's Secret is what the
API serves: no read of the Pod's files, no exec into it."""

from __future__ import annotations

import base64
import dataclasses
import json
from datetime import datetime, timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api import admin, schemas
from api.auth import Principal
from api.db.base import utcnow
from api.db.models import Org
from api.errors import Forbidden, NotFound, Unauthorized
from api.instances.providers.kubernetes import manifests, names
from api.instances.providers.kubernetes.provider import KubernetesProvider
from api.instances.service import InstanceService
from api.settings import Settings
from tests.api.lifecycle_support import principal
from tests.conftest import both_databases
from tests.k8s.conftest import NS, make_spec, validate_strict
from tests.k8s.fake_apiserver import FakeApiServer

HEADER = b'{"version": 2, "width": 80, "height": 24, "timestamp": 1}\n'


def the_runner(server: FakeApiServer, sid: str) -> tuple[str, schemas.RunnerSpec]:
    """What the runner container is given: its token (from the Secret) and its spec (from the Pod)."""
    secret = server.get("secrets", NS, names.secret_name(sid))
    pod = server.get("pods", NS, names.pod_name(sid))
    assert secret is not None and pod is not None
    validate_strict(pod)
    runner = pod["spec"]["containers"][0]
    assert runner["name"] == "runner"
    env = {e["name"]: e.get("value") for e in runner["env"]}
    return (base64.b64decode(secret["data"]["ORZ_RUNNER_TOKEN"]).decode(),
            schemas.RunnerSpec.model_validate_json(env["ORZ_RUNNER_SPEC"]))


def test_the_runner_container_is_told_the_recording_cap() -> None:
    for cap in (0, 8 * 1024 * 1024):
        pod = manifests.pod(dataclasses.replace(make_spec(), recording_max_bytes=cap), manifests.ClusterConfig())
        validate_strict(pod)
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert json.loads(env["ORZ_RUNNER_SPEC"])["recording_max_bytes"] == cap


@both_databases
async def test_a_pods_runner_records_uploads_and_the_api_serves_it(
        service: InstanceService, server: FakeApiServer, settings: Settings) -> None:
    who: Principal = await principal(service.db_sessions, "acme")
    inst = await service.create(who, schemas.InstanceCreate(program="claude"))
    token, spec = the_runner(server, inst.id)
    assert spec.recording_max_bytes == settings.recording_max_bytes > 0

    data = HEADER + b'[0.5, "o", "hello from the pod"]\n'
    ack = await service.upload_recording(inst.id, token, "part-1", 0, data)
    assert ack == schemas.RecordingAck(part="part-1", offset=len(data))
    assert await service.read_recording(who, inst.id) == data

    # The org turns recording off: the running Pod's uploads are refused, and its next Pod is not told to record.
    async with service.db_sessions() as db:
        org = await db.get(Org, inst.org_id)
        assert org is not None
        org_name = org.name
    await admin.set_recording(service.db_sessions, org_name, False)
    with pytest.raises(Forbidden, match="recording is turned off"):
        await service.upload_recording(inst.id, token, "part-1", len(data), b'[1, "o", "more"]\n')
    with pytest.raises(NotFound, match="turned off for your org"):
        await service.read_recording(who, inst.id)
    await service.stop(who, inst.id)
    await service.start(who, inst.id)
    _token, spec = the_runner(server, inst.id)
    assert spec.recording_max_bytes == 0


@both_databases
async def test_a_stopped_pods_runner_may_send_its_last_upload_and_nothing_else(
        settings: Settings, sessions: async_sessionmaker[AsyncSession], provider: KubernetesProvider,
        server: FakeApiServer) -> None:
    """A stop deletes the Pod and takes the runner's token at once; the runner, on its SIGTERM, still sends
    what the pane printed last: that upload is taken, for the Pod's termination grace period, and nothing else."""
    now = [utcnow()]

    def clock() -> datetime:
        return now[0]

    service = InstanceService(settings, sessions, provider, clock=clock,
                              gateway_public_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGateway gateway")
    who: Principal = await principal(service.db_sessions, "acme")
    inst = await service.create(who, schemas.InstanceCreate(program="claude"))
    token, _spec = the_runner(server, inst.id)
    data = HEADER + b'[0.5, "o", "working"]\n'
    await service.upload_recording(inst.id, token, "part-1", 0, data)

    await service.stop(who, inst.id)
    pod = server.get("pods", NS, names.pod_name(inst.id))
    # Deleted, its runner has its SIGTERM, and the token is gone from the row already.
    assert pod is None or pod["metadata"].get("deletionTimestamp")
    assert pod is None or pod["spec"]["terminationGracePeriodSeconds"] == manifests.RUNNER_TERMINATION_GRACE_S
    last = b'[9.5, "o", "printed right before the stop"]\n'
    now[0] += timedelta(seconds=manifests.RUNNER_TERMINATION_GRACE_S - 1)
    ack = await service.upload_recording(inst.id, token, "part-1", len(data), last)
    assert ack.offset == len(data + last)
    assert await service.read_recording(who, inst.id) == data + last

    # The retired token is good for that upload alone: no heartbeat (which could bring the session back).
    with pytest.raises(Unauthorized):
        await service.record_heartbeat(inst.id, token, schemas.Heartbeat(attached_clients=1))
    # Once the Pod must be gone, not even an upload.
    now[0] += timedelta(seconds=2)
    with pytest.raises(Unauthorized):
        await service.upload_recording(inst.id, token, "part-1", len(data + last), b'[10, "o", "late"]\n')
    assert await service.read_recording(who, inst.id) == data + last

    # Started again: the new Pod's token works everywhere, the old one nowhere.
    await service.start(who, inst.id)
    new_token, _spec = the_runner(server, inst.id)
    assert new_token != token
    await service.record_heartbeat(inst.id, new_token, schemas.Heartbeat())
    with pytest.raises(Unauthorized):
        await service.upload_recording(inst.id, token, "part-1", len(data + last), b'[10, "o", "late"]\n')
    await service.wait_background()


@both_databases
async def test_a_deleted_sessions_runner_cannot_upload(
        service: InstanceService, server: FakeApiServer) -> None:
    who: Principal = await principal(service.db_sessions, "acme")
    inst = await service.create(who, schemas.InstanceCreate(program="claude"))
    token, _spec = the_runner(server, inst.id)
    await service.delete(who, inst.id)
    with pytest.raises(Unauthorized):
        await service.upload_recording(inst.id, token, "part-1", 0, HEADER)
