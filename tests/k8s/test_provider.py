"""KubernetesProvider against a FAKE Kubernetes API server (tests/k8s/fake_apiserver.py).

There is no cluster here: a small in-process HTTP server stands in for the API server, implementing
the REST paths the provider uses, so the official ``kubernetes`` client runs over real HTTP. Pods do
not run; tests move them between phases. The same provider runs against kind in tests/e2e.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from kubernetes import client as k8s

from api.instances.providers.base import ComputeStatus, ProviderFailure
from api.instances.providers.kubernetes import names
from api.instances.providers.kubernetes.provider import KubernetesProvider
from api.schemas import RUNNER_OPERATOR_LOGGER
from api.settings import Settings
from tests.k8s.conftest import NS, make_spec, pod_route
from tests.k8s.fake_apiserver import FakeApiServer

SID = "brave-otter-42"


async def eventually(check: Callable[[], object], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def wait_status(provider: KubernetesProvider, state: dict, phase: str) -> ComputeStatus:
    deadline = time.monotonic() + 3.0
    while True:
        status = await provider.status(SID, state)
        if status.phase == phase or time.monotonic() > deadline:
            assert status.phase == phase, status
            return status
        await asyncio.sleep(0.02)


async def test_create_makes_all_objects_owned_by_the_root(provider: KubernetesProvider,
                                                         server: FakeApiServer) -> None:
    state = await provider.create(make_spec(SID, secret_env={"GITHUB_TOKEN": "ghp_x"}))
    assert state == {"namespace": NS, "root": "orz-brave-otter-42", "pod": "orz-brave-otter-42",
                     "pvc": "orz-brave-otter-42-ws", "secret": "orz-brave-otter-42-env",
                     "networkpolicy": "orz-brave-otter-42", "generation": 1, "stopped": False}
    root = server.get("configmaps", NS, state["root"])
    assert root is not None
    owned = [("pods", state["pod"]), ("secrets", state["secret"]), ("persistentvolumeclaims", state["pvc"]),
             ("networkpolicies", state["networkpolicy"])]
    for plural, name in owned:
        obj = server.get(plural, NS, name)
        assert obj is not None, plural
        assert obj["metadata"]["ownerReferences"][0]["uid"] == root["metadata"]["uid"]
    # Right after create the cache already knows the pod: no "absent" blip.
    assert (await provider.status(SID, state)).phase == "pending"


async def test_create_is_idempotent(provider: KubernetesProvider, server: FakeApiServer) -> None:
    spec = make_spec(SID)
    first = await provider.create(spec)
    second = await provider.create(spec)
    assert first == second
    assert server.names("pods", NS) == ["orz-brave-otter-42"]
    assert server.count("POST", "pods") == 2  # the second one got 409 and was accepted


async def test_status_follows_the_watch_without_polling(provider: KubernetesProvider,
                                                        server: FakeApiServer) -> None:
    state = await provider.create(make_spec(SID))
    server.set_pod_phase(NS, state["pod"], "Running", ip="10.1.2.3")
    await wait_status(provider, state, "running")
    gets_before = server.count("GET", "pods")
    for _ in range(20):
        assert (await provider.status(SID, state)).phase == "running"
    # The watch may reconnect meanwhile (every second here), but the polls make no requests of their own.
    assert server.count("GET", "pods") - gets_before <= 1
    assert pod_route(provider, SID, state) == ("10.1.2.3", 2222)


async def test_stop_keeps_workspace_and_secret_then_start_recreates_the_pod(
    provider: KubernetesProvider, server: FakeApiServer
) -> None:
    server.store.pod_termination_s = 1.0  # the stand-in kubelet takes a second to stop the containers
    spec = make_spec(SID)
    state = await provider.create(spec)
    old_uid = server.get("pods", NS, state["pod"])["metadata"]["uid"]
    stopped = await provider.stop(SID, state)
    assert stopped["stopped"] is True
    terminating = server.get("pods", NS, state["pod"])
    assert terminating is not None and terminating["metadata"]["deletionTimestamp"]
    assert server.get("persistentvolumeclaims", NS, state["pvc"]) is not None
    assert server.get("secrets", NS, state["secret"]) is not None
    assert (await provider.status(SID, stopped)).phase == "stopped"
    assert await provider.stop(SID, stopped) == stopped  # stopping twice is fine

    # Started while the old pod still terminates: the provider waits for it to go, then makes a new one.
    started = await provider.start(spec, stopped)
    assert started["generation"] == 2 and started["stopped"] is False
    pod = server.get("pods", NS, state["pod"])
    assert pod is not None and not pod["metadata"].get("deletionTimestamp")
    assert pod["metadata"]["uid"] != old_uid
    assert pod["metadata"]["annotations"][names.GENERATION_ANNOTATION] == "2"
    assert server.names("persistentvolumeclaims", NS) == [state["pvc"]]


async def test_start_refreshes_the_secret(provider: KubernetesProvider, server: FakeApiServer) -> None:
    state = await provider.stop(SID, await provider.create(make_spec(SID)))
    before = server.get("secrets", NS, state["secret"])
    await provider.start(make_spec(SID, secret_env={"NEW": "value"}), state)
    after = server.get("secrets", NS, state["secret"])
    assert before is not None and after is not None
    assert "NEW" in after["data"] and "NEW" not in before["data"]


async def test_delete_removes_everything_and_tolerates_missing(provider: KubernetesProvider,
                                                               server: FakeApiServer) -> None:
    state = await provider.create(make_spec(SID))
    await provider.delete(SID, state)
    for plural in ("pods", "configmaps", "secrets", "persistentvolumeclaims", "networkpolicies"):
        # The pod goes once its grace period ends; everything else at once.
        assert server.wait_for(lambda plural=plural: server.names(plural, NS) == [], 5), plural
    await provider.delete(SID, state)  # already gone: not an error
    await provider.delete("never-existed", {})


async def test_deleting_the_root_garbage_collects_the_rest(provider: KubernetesProvider,
                                                           server: FakeApiServer) -> None:
    state = await provider.create(make_spec(SID))
    await asyncio.to_thread(k8s.CoreV1Api(provider._api).delete_namespaced_config_map, state["root"], NS)
    # Garbage collection is asynchronous, as in a cluster: the dependents go soon after, not at once.
    for plural in ("pods", "secrets", "persistentvolumeclaims", "networkpolicies"):
        assert server.wait_for(lambda plural=plural: server.names(plural, NS) == [], 5), plural


async def test_list_by_label(provider: KubernetesProvider, server: FakeApiServer) -> None:
    a = await provider.create(make_spec("alpha"))
    await provider.stop("alpha", a)
    b = await provider.create(make_spec("beta"))
    server.set_pod_phase(NS, b["pod"], "Running", ip="10.0.0.9")
    await eventually(lambda: (provider.cache.get(b["pod"]) or {}).get("status", {}).get("phase") == "Running")
    listed = await provider.list()
    assert listed == {"alpha": ComputeStatus("stopped"), "beta": ComputeStatus("running")}


async def test_listing_sessions_costs_no_api_calls_once_watched(provider: KubernetesProvider,
                                                                server: FakeApiServer) -> None:
    """The reconciler lists every session each pass: from the watch caches, not a LIST per pass."""
    states = {sid: await provider.create(make_spec(sid)) for sid in ("alpha", "beta", "gamma")}
    await provider.stop("beta", states["beta"])
    first = await provider.list()
    pod_gets, map_gets = server.count("GET", "pods"), server.count("GET", "configmaps")
    for _ in range(3):
        assert await provider.list() == first
    assert (server.count("GET", "pods"), server.count("GET", "configmaps")) == (pod_gets, map_gets)
    # A change arrives by the watch: a root deleted elsewhere drops the session from the listing.
    server.store.delete("configmaps", NS, states["gamma"]["root"])
    await eventually(lambda: provider.roots.get(states["gamma"]["root"]) is None and
                     provider.cache.get(states["gamma"]["pod"]) is None)  # its Pod is garbage-collected
    assert set(await provider.list()) == {"alpha", "beta"}


async def test_caches_list_in_pages_and_keep_only_what_they_read(server: FakeApiServer) -> None:
    """10,000 sessions are never one LIST response, and a cached Pod holds its status, not its spec."""
    from api.instances.providers.kubernetes.cache import PodCache

    prov = KubernetesProvider(Settings(k8s_namespace=NS), k8s.ApiClient(k8s.Configuration(host=server.url)),
                              request_timeout_s=10.0, watch_timeout_s=1, sync_timeout_s=3.0)
    try:
        states = [await prov.create(make_spec(f"s{i}")) for i in range(5)]
    finally:
        await prov.close()
    server.set_pod_phase(NS, states[0]["pod"], "Running", ip="10.0.0.5")
    cache = PodCache(k8s.CoreV1Api(k8s.ApiClient(k8s.Configuration(host=server.url))), NS,
                     names.managed_selector(), page_size=2, watch_timeout_s=1)
    cache.start()
    try:
        assert cache.wait_synced(5)
        assert cache.pages == 3 and len(cache.items()) == 5
        pod = cache.get(states[0]["pod"])
        assert pod is not None and pod["status"]["phase"] == "Running" and pod["status"]["podIP"] == "10.0.0.5"
        assert "env" not in str(pod) and "volumes" not in pod["spec"]
        assert pod["metadata"]["annotations"][names.GENERATION_ANNOTATION] == "1"
    finally:
        cache.close()


async def test_watch_recovers_from_410_gone(provider: KubernetesProvider, server: FakeApiServer) -> None:
    state = await provider.create(make_spec(SID))
    await provider.status(SID, state)
    lists = provider.cache.lists
    server.expire_watches()
    # The watch times out every 2 s; on resuming from an expired version it must list again.
    await eventually(lambda: provider.cache.lists > lists, timeout=6.0)
    server.set_pod_phase(NS, state["pod"], "Running", ip="10.0.0.1")
    await wait_status(provider, state, "running")


@pytest.mark.parametrize(("status", "message", "expected"), [
    (409, "conflict", "conflicts with a change"),
    (403, 'pods "x" is forbidden: User "system:serviceaccount:a:b" cannot create', "not allowed"),
    (403, "pods is forbidden: exceeded quota: sessions-quota, requested: limits.cpu=2",
     "quota 'sessions-quota'"),
    (500, "etcd down", "unavailable (HTTP 500)"),
    (503, "try later", "unavailable (HTTP 503)"),
])
async def test_api_errors_become_clear_reasons(provider: KubernetesProvider, server: FakeApiServer,
                                               status: int, message: str, expected: str) -> None:
    # 409 on a create is "already exists" and fine; a conflict on replace is the real error.
    method = "PUT" if status == 409 else "POST"
    if status == 409:
        server.fail("POST", "secrets", 409, "already exists")
    server.fail(method, "secrets", status, message)
    spec = make_spec(SID)
    with pytest.raises(ProviderFailure) as info:
        await provider.create(spec)
    assert expected in info.value.reason
    assert spec.runner_token not in info.value.reason
    assert "Bearer" not in info.value.reason


async def test_rejected_object_reason_hides_secret_values(provider: KubernetesProvider,
                                                          server: FakeApiServer) -> None:
    spec = make_spec(SID, secret_env={"API_KEY": "sk-very-secret"})
    leak = f"Pod is invalid: env value sk-very-secret and token {spec.runner_token}"
    server.fail("POST", "pods", 422, leak)
    with pytest.raises(ProviderFailure) as info:
        await provider.create(spec)
    assert "rejected" in info.value.reason
    assert "sk-very-secret" not in info.value.reason and spec.runner_token not in info.value.reason


async def test_timeouts_become_clear_reasons(server: FakeApiServer) -> None:
    server.fail("POST", "configmaps", 500, "slow", delay_s=3.0)
    api = k8s.ApiClient(k8s.Configuration(host=server.url))
    prov = KubernetesProvider(Settings(k8s_namespace=NS), api, request_timeout_s=1.0, sync_timeout_s=3.0)
    try:
        with pytest.raises(ProviderFailure, match="did not answer in time"):
            await prov.create(make_spec(SID))
    finally:
        await prov.close()
        api.close()


async def test_unreachable_api_fails_clearly() -> None:
    with FakeApiServer() as srv:
        url = srv.url
    api = k8s.ApiClient(k8s.Configuration(host=url))
    prov = KubernetesProvider(Settings(), api, request_timeout_s=1.0, sync_timeout_s=0.5)
    try:
        with pytest.raises(ProviderFailure, match=r"could not be reached|did not answer"):
            await prov.create(make_spec(SID))
        with pytest.raises(ProviderFailure, match=r"could not watch session pods: .*could not be reached"):
            await prov.status(SID, {})
    finally:
        await prov.close()
        api.close()


async def test_bad_spec_fails_before_any_object_exists(provider: KubernetesProvider,
                                                       server: FakeApiServer) -> None:
    with pytest.raises(ProviderFailure, match=r"resources\.cpu"):
        await provider.create(make_spec(SID, resources={"cpu": "many"}))
    assert server.cluster.requests == []


async def test_status_reports_a_forbidden_watch_quickly(provider: KubernetesProvider,
                                                        server: FakeApiServer) -> None:
    server.fail("GET", "pods", 403, 'pods is forbidden: User "x" cannot list', times=100)
    started = time.monotonic()
    with pytest.raises(ProviderFailure, match="not allowed"):
        await provider.status(SID, {})
    assert time.monotonic() - started < 2.0


async def test_start_fails_clearly_while_the_old_pod_will_not_go(provider: KubernetesProvider,
                                                                 server: FakeApiServer) -> None:
    server.store.pod_termination_s = 60.0  # the old pod outlives the provider's wait (1 s here)
    spec = make_spec(SID)
    stopped = await provider.stop(SID, await provider.create(spec))
    old_uid = server.get("pods", NS, stopped["pod"])["metadata"]["uid"]
    with pytest.raises(ProviderFailure, match="previous pod is still shutting down"):
        await asyncio.wait_for(provider.start(spec, stopped), 15)  # a provider that waited forever fails here
    lingering = server.get("pods", NS, stopped["pod"])
    assert lingering["metadata"]["uid"] == old_uid and lingering["metadata"]["deletionTimestamp"]
    # Once it is gone, the same start succeeds.
    server.store.pod_termination_s = 0.0
    assert server.wait_for(lambda: server.get("pods", NS, stopped["pod"]) is None, 5)
    started = await provider.start(spec, stopped)
    assert server.get("pods", NS, started["pod"])["metadata"]["uid"] != old_uid


async def test_start_replaces_a_secret_another_writer_changed(provider: KubernetesProvider,
                                                              server: FakeApiServer) -> None:
    state = await provider.stop(SID, await provider.create(make_spec(SID, secret_env={"OLD": "1"})))
    # Someone else writes the Secret meanwhile: the provider's copy has no resourceVersion, so its replace
    # is unconditional (no 409) and its content wins.
    other = k8s.CoreV1Api(provider._api)
    await asyncio.to_thread(other.patch_namespaced_secret, state["secret"], NS, {"data": {"EXTRA": "eA=="}})
    await provider.start(make_spec(SID, secret_env={"NEW": "value"}), state)
    after = server.get("secrets", NS, state["secret"])
    assert after is not None and "NEW" in after["data"]
    assert "EXTRA" not in after["data"] and "OLD" not in after["data"]


async def test_a_conflict_replacing_the_secret_fails_clearly_and_leaves_no_pod(provider: KubernetesProvider,
                                                                              server: FakeApiServer) -> None:
    state = await provider.stop(SID, await provider.create(make_spec(SID)))
    assert server.wait_for(lambda: server.get("pods", NS, state["pod"]) is None, 5)
    server.fail("PUT", "secrets", 409, 'Operation cannot be fulfilled on secrets "x": the object has been modified')
    with pytest.raises(ProviderFailure, match="could not store the session's secrets: it conflicts"):
        await provider.start(make_spec(SID), state)
    assert server.get("pods", NS, state["pod"]) is None  # nothing started on a half-written Secret


async def test_the_runner_log_users_read_leaves_out_what_only_operators_may(
        provider: KubernetesProvider, server: FakeApiServer, tmp_path: Path) -> None:
    """`orz cloud logs` on Kubernetes is the runner container's log: git's words for a repository host it
    could not reach (the runner's operator logger) would tell the session's owner which names and ports of the
    operator's network answer, where the session's error says one sentence for all. kubectl logs keeps them."""
    state = await provider.create(make_spec(SID))
    container_log = tmp_path / "runner.log"
    container_log.write_text(
        "2026-12-06 18:00:00,001 INFO runner.workspace: cloning https://10.0.0.7:8443/a.git (branch default)\n"
        f"2026-12-06 18:00:00,120 WARNING {RUNNER_OPERATOR_LOGGER}: git clone failed: fatal: unable to access "
        "'https://10.0.0.7:8443/a.git/': Failed to connect to 10.0.0.7 port 8443: Connection refused\n"
        "2026-12-06 18:00:00,121 ERROR runner.main: fatal: git clone failed: could not reach the host\n")
    server.logs[(NS, state["pod"], names.RUNNER_CONTAINER)] = container_log
    shown = await provider.read_log(SID, state)
    assert "Connection refused" not in shown and "10.0.0.7 port" not in shown, shown
    assert shown.endswith("ERROR runner.main: fatal: git clone failed: could not reach the host\n"), shown
    assert "cloning https://10.0.0.7:8443/a.git" in shown  # the rest of the log as it was
