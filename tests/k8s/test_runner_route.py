"""Where the gateway goes for a Kubernetes session: its own Pod, whatever its runner says (InstanceService with
the KubernetesProvider against the fake API server, on SQLite and PostgreSQL)."""

from __future__ import annotations

from api import schemas
from api.instances.providers.kubernetes import manifests, names
from api.instances.service import InstanceService
from tests.api.lifecycle_support import principal
from tests.conftest import both_databases
from tests.k8s.conftest import NS
from tests.k8s.fake_apiserver import FakeApiServer
from tests.k8s.test_recording_k8s import the_runner

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGZha2Uta2V5LWZvci10ZXN0cy0wMDAw"


@both_databases
async def test_a_runner_cannot_send_the_gateway_to_another_sessions_pod(
        service: InstanceService, server: FakeApiServer) -> None:
    # The agent in a session can read its runner token. Were the route its heartbeat names taken as is, its
    # owner attaching to it would be taken, with the client key every runner trusts, to the runner of a
    # session of another org: the route must be the session's own Pod.
    attacker = await principal(service.db_sessions, "mallory")
    victim = await principal(service.db_sessions, "acme")
    theirs = await service.create(victim, schemas.InstanceCreate(program="claude"))
    mine = await service.create(attacker, schemas.InstanceCreate(program="claude"))
    server.set_pod_phase(NS, names.pod_name(theirs.id), "Running", ip="10.0.0.21")
    server.set_pod_phase(NS, names.pod_name(mine.id), "Running", ip="10.0.0.66")
    token, _spec = the_runner(server, mine.id)
    port = manifests.RUNNER_SSH_PORT

    async def route() -> schemas.Route | None:
        reply = await service.authorize(schemas.AuthorizeRequest(session_id=mine.id, user_id=attacker.user_id,
                                                                 method="certificate"))
        return reply.route

    for host, p in (("10.0.0.21", port), ("10.0.0.66", 22), ("api.orz-system.svc", port)):
        await service.record_heartbeat(mine.id, token, schemas.Heartbeat(
            host_key=HOST_KEY, ssh_host=host, ssh_port=p, init_status="succeeded"))
        assert await route() is None, (host, p)
    # Its own Pod's address is taken (from the API server, ahead of the watch, or from the watch).
    await service.record_heartbeat(mine.id, token, schemas.Heartbeat(
        host_key=HOST_KEY, ssh_host="10.0.0.66", ssh_port=port, init_status="succeeded"))
    assert await route() == schemas.Route(host="10.0.0.66", port=port, host_key=HOST_KEY)
    # And a later heartbeat naming another session's Pod does not move it.
    await service.record_heartbeat(mine.id, token, schemas.Heartbeat(
        host_key=HOST_KEY, ssh_host="10.0.0.21", ssh_port=port, init_status="succeeded"))
    assert (await route()) == schemas.Route(host="10.0.0.66", port=port, host_key=HOST_KEY)
