"""The session owner's git identity reaches a Kubernetes session's runner (its spec in the Pod), as it reaches
the local provider's (tests/api/test_lifecycle_local.py commits in a real session)."""

from __future__ import annotations

import json

from api import schemas
from api.instances.service import InstanceService
from api.instances.service_base import owner_identity
from tests.api.lifecycle_support import principal
from tests.conftest import both_databases
from tests.k8s.fake_apiserver import FakeApiServer
from tests.k8s.test_recording_k8s import the_runner


@both_databases
async def test_the_pods_runner_is_told_the_owners_git_identity(service: InstanceService,
                                                               server: FakeApiServer) -> None:
    who = await principal(service.db_sessions, "acme")
    inst = await service.create(who, schemas.InstanceCreate(program="claude"))
    token, spec = the_runner(server, inst.id)  # the Pod validates (validate_strict)
    assert (spec.owner_name, spec.owner_email) == (who.email.split("@", 1)[0], who.email)
    assert token not in json.dumps(spec.model_dump(mode="json"))


def test_an_owner_without_a_usable_email_gets_a_noreply_address() -> None:
    assert owner_identity("usr_1", "ada@example.com", "ada-gh", "https://orz.example.com") == (
        "ada-gh", "ada@example.com")
    assert owner_identity("usr_1", "", None, "https://orz.example.com:8443/") == (
        "usr_1", "usr_1@users.noreply.orz.example.com")
    assert owner_identity("usr_1", "not an email", "Ada\nLovelace", "http://127.0.0.1:8080") == (
        "Ada Lovelace", "usr_1@users.noreply.127.0.0.1")
