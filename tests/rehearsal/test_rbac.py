"""RBAC on the rehearsal's API server (rehearsal/rbac.py): a service account may do what its roles grant."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from rehearsal.apiserver import FakeApiServer
from rehearsal.kubelet import ServiceAccountTokens
from rehearsal.rbac import Authorizer
from rehearsal.store import Store
from tests.rehearsal.conftest import NS, status_of

ADMIN = "admin-token"


@pytest.fixture
def secured() -> Iterator[tuple[FakeApiServer, str]]:
    """A server whose service account `reader` may get (not list) ConfigMaps in NS; its token."""
    store = Store(require_namespaces=True)
    tokens = ServiceAccountTokens()
    with FakeApiServer(store=store, authorizer=Authorizer(store, tokens, ADMIN)) as server:
        store.create("namespaces", "", {"metadata": {"name": NS}})
        store.create("roles", NS, {"metadata": {"name": "read-one"}, "rules": [
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]})
        store.create("rolebindings", NS, {"metadata": {"name": "read-one"},
                                          "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                                      "name": "read-one"},
                                          "subjects": [{"kind": "ServiceAccount", "name": "reader",
                                                        "namespace": NS}]})
        store.create("configmaps", NS, {"metadata": {"name": "c"}, "data": {"k": "v"}})
        yield server, tokens.issue(NS, "reader")


_clients: list[k8s.ApiClient] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


def core_with(server: FakeApiServer, token: str) -> k8s.CoreV1Api:
    config = k8s.Configuration(host=server.url, api_key={"authorization": token},
                               api_key_prefix={"authorization": "Bearer"})
    _clients.append(k8s.ApiClient(config))
    return k8s.CoreV1Api(_clients[-1])


def test_a_granted_verb_is_allowed(secured: tuple[FakeApiServer, str]) -> None:
    server, token = secured
    assert core_with(server, token).read_namespaced_config_map("c", NS).data == {"k": "v"}


def test_an_ungranted_verb_is_403_naming_the_service_account(secured: tuple[FakeApiServer, str]) -> None:
    server, token = secured
    with pytest.raises(ApiException) as info:
        core_with(server, token).list_namespaced_config_map(NS)
    assert info.value.status == 403
    assert f'User \\"system:serviceaccount:{NS}:reader\\" cannot list resource \\"configmaps\\"' in info.value.body
    core = core_with(server, token)
    assert status_of(lambda: core.read_namespaced_config_map("c", "default")) == 403  # other namespace
    assert status_of(lambda: core.read_namespaced_secret("c", NS)) == 403  # other resource


def test_an_unknown_token_is_401_and_the_admin_may_do_anything(secured: tuple[FakeApiServer, str]) -> None:
    server, _ = secured
    assert status_of(lambda: core_with(server, "forged").read_namespaced_config_map("c", NS)) == 401
    assert len(core_with(server, ADMIN).list_namespaced_config_map(NS).items) == 1
