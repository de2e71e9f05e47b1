"""Fixtures for the rehearsal's API server tests: the server over real HTTP and the official client on it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from rehearsal.apiserver import FakeApiServer
from rehearsal.store import Store

NS = "team"


def status_of(call: Callable[[], Any]) -> int:
    """The HTTP status `call` fails with (200 when it succeeds)."""
    try:
        call()
    except ApiException as exc:
        return int(exc.status)
    return 200


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    """Namespaces must exist (as on a real server); no kubelet, so terminating pods go after 0.2 s."""
    with FakeApiServer(store=Store(require_namespaces=True), bookmark_every_s=0.2) as srv:
        srv.store.create("namespaces", "", {"metadata": {"name": NS}})
        yield srv


@pytest.fixture
def api(server: FakeApiServer) -> Iterator[k8s.ApiClient]:
    client = k8s.ApiClient(k8s.Configuration(host=server.url))
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def core(api: k8s.ApiClient) -> k8s.CoreV1Api:
    return k8s.CoreV1Api(api)


@pytest.fixture
def apps(api: k8s.ApiClient) -> k8s.AppsV1Api:
    return k8s.AppsV1Api(api)
