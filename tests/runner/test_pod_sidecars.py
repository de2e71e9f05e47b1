"""Pod mode (Kubernetes): the runner never starts sidecars itself; it reports the services of
.orz/cloud.yaml when its Pod lacks them, and otherwise waits for their ports before init."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from api.schemas import SidecarSpec, services_digest
from runner.main import POD_STARTED_FILE
from runner.workspace import INIT_MARKER
from tests.runner.conftest import MakeRepo, StartRunner
from tests.runner.fake_api import FakeApi
from tests.support import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

SECRET_VALUE = "s3cret-pw-value"




def config(port: int) -> str:
    # rabbitmq cannot run on the local provider: pod mode must not even try.
    return f"""\
version: "1.0"
setup:
  init: echo init-ran >> init-count
services:
  db:
    image: postgres:16
    env: {{POSTGRES_USER: app, POSTGRES_PASSWORD: "${{PG_PASSWORD}}", DATABASE_URL: "pg://app:${{PG_PASSWORD}}@x/app"}}
    ports: [{port}]
    health: {{command: pg_isready, interval: 500ms, timeout: 2s, retries: 5}}
  queue:
    image: rabbitmq:3
"""


def reported(port: int) -> list[dict[str, Any]]:
    """What the API receives for config(port): secret references as written, never their values."""
    return [
        {"name": "db", "image": "postgres:16", "ports": [port],
         "env": {"POSTGRES_USER": "app", "POSTGRES_PASSWORD": "${PG_PASSWORD}",
                 "DATABASE_URL": "pg://app:${PG_PASSWORD}@x/app"},
         "health": {"command": "pg_isready", "interval": 0.5, "timeout": 2.0, "retries": 5}},
        {"name": "queue", "image": "rabbitmq:3", "env": {}, "ports": []},
    ]


def pod_digest(services: list[dict[str, Any]]) -> str:
    """The digest the API puts in the runner spec of a Pod built with these services (as it stores them)."""
    return services_digest([SidecarSpec.model_validate(s).model_dump(mode="json") for s in services])


async def test_a_pod_without_the_services_gets_them_reported_and_starts_nothing(
        make_repo: MakeRepo, start_runner: StartRunner, fake_api: FakeApi) -> None:
    port = free_port()
    handle = await start_runner(make_repo({".orz/cloud.yaml": config(port)}), secrets={"PG_PASSWORD": SECRET_VALUE},
                                sidecars="pod", pod_services_digest=services_digest([]))
    first = await fake_api.wait_for(lambda b: b.get("services"))
    assert first["services"] == reported(port)
    # Reported until the Pod is replaced, and meanwhile nothing starts: no endpoint, no init, no sidecar.
    await fake_api.wait_for(lambda b: b is not first and b.get("services"), timeout=5)
    assert not handle.task.done()
    for body in fake_api.bodies():
        assert not body.get("ssh_port") and not body.get("host_key") and not body.get("program_running")
        assert body["init_status"] == "pending"
    assert not (handle.runner.state_dir / "services").exists()
    assert not (handle.runner.workspace / INIT_MARKER).exists()
    assert not (handle.runner.state_dir / POD_STARTED_FILE).exists()
    assert SECRET_VALUE not in json.dumps(fake_api.bodies())
    assert await handle.finish() == 0


async def test_a_pod_with_the_services_waits_for_their_ports_then_runs_init_once(
        make_repo: MakeRepo, start_runner: StartRunner, fake_api: FakeApi) -> None:
    port = free_port()
    handle = await start_runner(make_repo({".orz/cloud.yaml": config(port)}), secrets={"PG_PASSWORD": SECRET_VALUE},
                                sidecars="pod", pod_services_digest=pod_digest(reported(port)))
    await fake_api.wait_for(lambda b: b.get("ssh_port"))
    await asyncio.sleep(1.0)  # the sidecar's port is still closed: init must not have run
    assert not (handle.runner.workspace / "init-count").exists()
    assert not any(b.get("program_running") for b in fake_api.bodies())

    sidecar = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
    try:
        await handle.ready()
    finally:
        sidecar.close()
    assert (handle.runner.workspace / "init-count").read_text() == "init-ran\n"
    assert not any(b.get("services") for b in fake_api.bodies())
    assert not (handle.runner.state_dir / "services").exists()  # no local postgres
    assert await handle.finish() == 0


async def test_changed_services_after_a_container_restart_wait_for_the_next_start(
        make_repo: MakeRepo, start_runner: StartRunner, fake_api: FakeApi, short_tmp: Path) -> None:
    url = make_repo({".orz/cloud.yaml": 'version: "1.0"\nservices:\n  cache:\n    image: redis:7\n'})
    # A runner of this Pod got past the check before (the state dir lives as long as the Pod); replacing
    # the Pod now would cut off its user.
    (short_tmp / "s2" / "state").mkdir(parents=True)
    (short_tmp / "s2" / "state" / POD_STARTED_FILE).touch()
    handle = await start_runner(url, sidecars="pod", pod_services_digest=services_digest([]), name="s2")
    await handle.ready()
    assert not any(b.get("services") for b in fake_api.bodies())
    assert await handle.finish() == 0


async def test_a_reference_to_a_missing_secret_is_still_fatal_in_pod_mode(
        make_repo: MakeRepo, start_runner: StartRunner, fake_api: FakeApi) -> None:
    handle = await start_runner(make_repo({".orz/cloud.yaml": config(free_port())}), sidecars="pod",
                                pod_services_digest=services_digest([]))
    assert await asyncio.wait_for(handle.task, 15) == 2
    fatal = fake_api.bodies()[-1]["fatal_error"]
    assert fatal.startswith(".orz/cloud.yaml:7: services.db.env.POSTGRES_PASSWORD: ${PG_PASSWORD} is not")
    assert not any(b.get("services") for b in fake_api.bodies())
