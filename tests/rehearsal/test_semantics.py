"""The rehearsal's API server behaves as a real one where a client notices, seen through the official client.

Each test drives rehearsal/apiserver.py over real HTTP with the `kubernetes` package, the client the
provider uses, so a request or response shape the real server would not produce fails here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes import watch
from kubernetes.client.exceptions import ApiException

from rehearsal.apiserver import FakeApiServer
from tests.rehearsal.conftest import NS, status_of

Body = dict[str, Any]


def config_map(name: str, data: dict[str, str] | None = None, **meta: Any) -> Body:
    return {"metadata": {"name": name, **meta}, "data": data if data is not None else {"k": "v"}}


def pod(name: str, **meta: Any) -> Body:
    return {"metadata": {"name": name, **meta}, "spec": {"containers": [{"name": "main", "image": "busybox"}]}}


def owned_by(owner: Any) -> list[Body]:
    return [{"apiVersion": "v1", "kind": "ConfigMap", "name": owner.metadata.name, "uid": owner.metadata.uid}]


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def watch_events(list_fn: Callable[..., Any], count: int, **kwargs: Any) -> list[Body]:
    """The first `count` raw watch events (or all of them until the 1 s server timeout)."""
    stream = watch.Watch()
    out: list[Body] = []
    for event in stream.stream(list_fn, NS, timeout_seconds=1, **kwargs):
        out.append({"type": event["type"], "object": event["raw_object"]})
        if len(out) >= count:
            stream.stop()
    return out


# ------------------------------------------------------------------------------------------- deletion

def test_deleting_a_pod_is_graceful_then_it_goes(server: FakeApiServer, core: k8s.CoreV1Api) -> None:
    server.store.pod_termination_s = 60.0  # the stand-in kubelet is slow: the pod lingers
    core.create_namespaced_pod(NS, pod("p"))
    answered = core.delete_namespaced_pod("p", NS)
    assert answered.metadata.deletion_timestamp is not None
    assert answered.metadata.deletion_grace_period_seconds == 30
    lingering = core.read_namespaced_pod("p", NS)
    assert lingering.metadata.deletion_timestamp is not None
    server.store.pod_termination_s = 0.0  # the containers are gone now
    assert eventually(lambda: status_of(lambda: core.read_namespaced_pod("p", NS)) == 404)


def test_a_pod_deleted_with_zero_grace_goes_at_once(server: FakeApiServer, core: k8s.CoreV1Api) -> None:
    server.store.pod_termination_s = 60.0
    core.create_namespaced_pod(NS, pod("p"))
    core.delete_namespaced_pod("p", NS, grace_period_seconds=0)
    assert status_of(lambda: core.read_namespaced_pod("p", NS)) == 404


def test_a_status_update_does_not_finish_a_terminating_pod(server: FakeApiServer, core: k8s.CoreV1Api) -> None:
    server.store.pod_termination_s = None  # a kubelet finishes deletions; here nobody does until told
    scheduled = pod("p")
    scheduled["spec"]["nodeName"] = "node-1"  # an unscheduled pod would go at once, as on a real server
    core.create_namespaced_pod(NS, scheduled)
    core.delete_namespaced_pod("p", NS)
    current = core.read_namespaced_pod("p", NS)
    # The kubelet reports the containers stopping while the grace period runs: the pod must stay.
    core.replace_namespaced_pod_status("p", NS, {"metadata": {"name": "p"}, "spec": current.to_dict()["spec"],
                                                 "status": {"phase": "Succeeded"}})
    assert core.read_namespaced_pod("p", NS).status.phase == "Succeeded"
    server.store.finish_pod_deletion(NS, "p")
    assert status_of(lambda: core.read_namespaced_pod("p", NS)) == 404


def test_a_finalizer_holds_deletion_until_it_is_removed(core: k8s.CoreV1Api) -> None:
    core.create_namespaced_config_map(NS, config_map("held", finalizers=["example.com/hold"]))
    core.delete_namespaced_config_map("held", NS)
    held = core.read_namespaced_config_map("held", NS)
    assert held.metadata.deletion_timestamp is not None
    core.patch_namespaced_config_map("held", NS, {"metadata": {"finalizers": None}})
    assert status_of(lambda: core.read_namespaced_config_map("held", NS)) == 404


def test_background_deletion_collects_dependents(core: k8s.CoreV1Api) -> None:
    owner = core.create_namespaced_config_map(NS, config_map("owner"))
    core.create_namespaced_config_map(NS, config_map("dependent", ownerReferences=owned_by(owner)))
    core.delete_namespaced_config_map("owner", NS, propagation_policy="Background")
    assert status_of(lambda: core.read_namespaced_config_map("owner", NS)) == 404
    assert eventually(lambda: status_of(lambda: core.read_namespaced_config_map("dependent", NS)) == 404)


def test_orphan_deletion_keeps_dependents_without_the_owner(core: k8s.CoreV1Api) -> None:
    owner = core.create_namespaced_config_map(NS, config_map("owner"))
    core.create_namespaced_config_map(NS, config_map("dependent", ownerReferences=owned_by(owner)))
    core.delete_namespaced_config_map("owner", NS, propagation_policy="Orphan")
    time.sleep(0.3)  # several rounds of the garbage collector
    dependent = core.read_namespaced_config_map("dependent", NS)
    assert not dependent.metadata.owner_references


def test_foreground_deletion_waits_for_dependents(core: k8s.CoreV1Api) -> None:
    owner = core.create_namespaced_config_map(NS, config_map("owner"))
    core.create_namespaced_config_map(NS, config_map("dependent", ownerReferences=owned_by(owner),
                                                     finalizers=["example.com/hold"]))
    core.delete_namespaced_config_map("owner", NS, propagation_policy="Foreground")
    # The garbage collector deletes the dependent; its finalizer keeps it, and so the owner stays too.
    assert eventually(lambda: core.read_namespaced_config_map("dependent", NS).metadata.deletion_timestamp)
    waiting = core.read_namespaced_config_map("owner", NS)
    assert waiting.metadata.deletion_timestamp is not None
    assert "foregroundDeletion" in waiting.metadata.finalizers
    core.patch_namespaced_config_map("dependent", NS, {"metadata": {"finalizers": None}})
    assert eventually(lambda: status_of(lambda: core.read_namespaced_config_map("owner", NS)) == 404)


# ----------------------------------------------------------------------------------------- namespaces

def test_content_needs_its_namespace(core: k8s.CoreV1Api) -> None:
    assert status_of(lambda: core.create_namespaced_config_map("nowhere", config_map("c"))) == 404


def test_deleting_a_namespace_deletes_its_content(core: k8s.CoreV1Api) -> None:
    core.create_namespace({"metadata": {"name": "doomed"}})
    core.create_namespaced_config_map("doomed", config_map("plain"))
    core.create_namespaced_config_map("doomed", config_map("held", finalizers=["example.com/hold"]))
    core.delete_namespace("doomed")
    assert core.read_namespace("doomed").status.phase == "Terminating"
    assert eventually(lambda: status_of(lambda: core.read_namespaced_config_map("plain", "doomed")) == 404)
    # While its content finishes, the namespace refuses anything new.
    assert status_of(lambda: core.create_namespaced_config_map("doomed", config_map("late"))) == 403
    core.patch_namespaced_config_map("held", "doomed", {"metadata": {"finalizers": None}})
    assert eventually(lambda: status_of(lambda: core.read_namespace("doomed")) == 404)


# ----------------------------------------------------------------------------------- writes and versions

def test_creating_an_existing_name_is_409_already_exists(core: k8s.CoreV1Api) -> None:
    core.create_namespaced_config_map(NS, config_map("c"))
    with pytest.raises(ApiException) as info:
        core.create_namespaced_config_map(NS, config_map("c"))
    assert info.value.status == 409 and "AlreadyExists" in info.value.body


def raw(api: k8s.ApiClient, method: str, path: str, body: Any = None) -> tuple[int, str]:
    """A request past the client's own model checks (what kubectl or client-go may send)."""
    response = api.call_api(*api.param_serialize(method, path, body=body,
                                                 header_params={"Content-Type": "application/json"}))
    response.read()
    return response.status, response.data.decode()


def test_an_unknown_field_is_422_invalid(api: k8s.ApiClient, core: k8s.CoreV1Api) -> None:
    body = pod("p")
    body["spec"]["containers"][0]["imagePullPolice"] = "Always"  # a typo the Python client would catch itself
    status, text = raw(api, "POST", f"/api/v1/namespaces/{NS}/pods", body)
    assert status == 422 and "Invalid" in text
    assert status_of(lambda: core.read_namespaced_pod("p", NS)) == 404


def test_replace_with_a_stale_resource_version_is_409(core: k8s.CoreV1Api) -> None:
    first = core.create_namespaced_config_map(NS, config_map("c", {"n": "1"})).to_dict()
    core.replace_namespaced_config_map("c", NS, {**config_map("c", {"n": "2"}),
                                                 "metadata": {"name": "c", "resourceVersion":
                                                              first["metadata"]["resource_version"]}})
    stale = {"metadata": {"name": "c", "resourceVersion": first["metadata"]["resource_version"]},
             "data": {"n": "3"}}
    with pytest.raises(ApiException) as info:
        core.replace_namespaced_config_map("c", NS, stale)
    assert info.value.status == 409 and "Conflict" in info.value.body
    assert core.read_namespaced_config_map("c", NS).data == {"n": "2"}


def test_replace_without_a_resource_version_is_unconditional(core: k8s.CoreV1Api) -> None:
    core.create_namespaced_config_map(NS, config_map("c", {"n": "1"}))
    core.patch_namespaced_config_map("c", NS, {"data": {"n": "2"}})
    core.replace_namespaced_config_map("c", NS, config_map("c", {"n": "3"}))
    assert core.read_namespaced_config_map("c", NS).data == {"n": "3"}


def test_every_write_moves_the_resource_version(core: k8s.CoreV1Api) -> None:
    made = core.create_namespaced_config_map(NS, config_map("c", {"n": "1"}))
    patched = core.patch_namespaced_config_map("c", NS, {"data": {"n": "2"}})
    assert int(patched.metadata.resource_version) > int(made.metadata.resource_version)


def test_a_put_of_the_object_keeps_its_status(server: FakeApiServer, core: k8s.CoreV1Api) -> None:
    core.create_namespaced_pod(NS, pod("p"))
    server.set_pod_phase(NS, "p", "Running", ip="10.0.0.5")
    body = core.read_namespaced_pod("p", NS).to_dict()
    replaced = core.replace_namespaced_pod("p", NS, {
        "metadata": {"name": "p", "labels": {"tier": "x"}}, "spec": pod("p")["spec"],
        "status": {"phase": "Failed"}})
    assert body["status"]["phase"] == "Running"
    assert replaced.status.phase == "Running" and replaced.status.pod_ip == "10.0.0.5"
    assert replaced.metadata.labels == {"tier": "x"}


def test_a_put_of_status_changes_only_status(core: k8s.CoreV1Api) -> None:
    core.create_namespaced_pod(NS, pod("p", labels={"tier": "a"}))
    changed = pod("p", labels={"tier": "b"})
    changed["spec"]["containers"][0]["image"] = "alpine"
    changed["status"] = {"phase": "Running"}
    answered = core.replace_namespaced_pod_status("p", NS, changed)
    assert answered.status.phase == "Running"
    assert answered.metadata.labels == {"tier": "a"}
    assert answered.spec.containers[0].image == "busybox"


def deployment(replicas: int, labels: dict[str, str] | None = None) -> Body:
    return {"metadata": {"name": "web", "labels": labels or {}},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [{"name": "web", "image": "nginx"}]}}}}


def test_generation_counts_spec_changes_only(apps: k8s.AppsV1Api) -> None:
    assert apps.create_namespaced_deployment(NS, deployment(1)).metadata.generation == 1
    relabelled = apps.replace_namespaced_deployment("web", NS, deployment(1, {"team": "a"}))
    assert relabelled.metadata.generation == 1
    scaled = apps.patch_namespaced_deployment("web", NS, {"spec": {"replicas": 3}})
    assert scaled.metadata.generation == 2


def test_a_merge_patch_null_removes_a_key(core: k8s.CoreV1Api) -> None:
    core.create_namespaced_config_map(NS, config_map("c", {"a": "1", "b": "2"}))
    patched = core.patch_namespaced_config_map("c", NS, {"data": {"a": None, "c": "3"}})
    assert patched.data == {"b": "2", "c": "3"}


def test_a_patch_with_a_stale_resource_version_is_409(core: k8s.CoreV1Api) -> None:
    made = core.create_namespaced_config_map(NS, config_map("c", {"n": "1"}))
    core.patch_namespaced_config_map("c", NS, {"data": {"n": "2"}})
    stale = {"metadata": {"resourceVersion": made.metadata.resource_version}, "data": {"n": "3"}}
    assert status_of(lambda: core.patch_namespaced_config_map("c", NS, stale)) == 409
    assert core.read_namespaced_config_map("c", NS).data == {"n": "2"}


def test_server_side_apply_creates_then_merges(core: k8s.CoreV1Api) -> None:
    applied = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "1"}}
    core.patch_namespaced_config_map("c", NS, applied, field_manager="test",
                                     _content_type="application/apply-patch+yaml")
    assert core.read_namespaced_config_map("c", NS).data == {"a": "1"}
    core.patch_namespaced_config_map("c", NS, {**applied, "data": {"b": "2"}}, field_manager="test",
                                     _content_type="application/apply-patch+yaml")
    assert core.read_namespaced_config_map("c", NS).data == {"a": "1", "b": "2"}


def test_an_unsupported_patch_type_is_415(core: k8s.CoreV1Api) -> None:
    core.create_namespaced_config_map(NS, config_map("c"))
    ops = [{"op": "replace", "path": "/data/k", "value": "w"}]
    assert status_of(lambda: core.patch_namespaced_config_map("c", NS, ops)) == 415


# --------------------------------------------------------------------------------------------- lists

def test_lists_page_with_limit_and_continue(core: k8s.CoreV1Api) -> None:
    for name in ("e", "c", "a", "d", "b"):
        core.create_namespaced_config_map(NS, config_map(name))
    seen, pages, token, versions = [], 0, None, set()
    while pages < 10:  # bounded: a server that ignored the token would page forever
        page = core.list_namespaced_config_map(NS, limit=2, _continue=token)
        pages += 1
        seen += [item.metadata.name for item in page.items]
        versions.add(page.metadata.resource_version)
        token = page.metadata._continue
        if not token:
            break
    assert seen == ["a", "b", "c", "d", "e"] and pages == 3
    assert len(versions) == 1  # every page is the same snapshot's


def test_a_continue_token_from_before_compaction_is_410(server: FakeApiServer, core: k8s.CoreV1Api) -> None:
    for name in ("a", "b", "c"):
        core.create_namespaced_config_map(NS, config_map(name))
    token = core.list_namespaced_config_map(NS, limit=1).metadata._continue
    server.expire_watches()
    with pytest.raises(ApiException) as info:
        core.list_namespaced_config_map(NS, limit=1, _continue=token)
    assert info.value.status == 410 and "Expired" in info.value.body


def test_field_selectors_filter_lists(core: k8s.CoreV1Api) -> None:
    for name in ("a", "b", "c"):
        core.create_namespaced_config_map(NS, config_map(name))

    def names(selector: str) -> list[str]:
        return [i.metadata.name for i in core.list_namespaced_config_map(NS, field_selector=selector).items]

    assert names("metadata.name=b") == ["b"]
    assert names("metadata.name==b") == ["b"]
    assert names("metadata.name!=b") == ["a", "c"]
    assert names("metadata.name!=a,metadata.name!=c") == ["b"]


def test_a_malformed_field_selector_is_400(core: k8s.CoreV1Api) -> None:
    assert status_of(lambda: core.list_namespaced_config_map(NS, field_selector="metadata.name")) == 400


# -------------------------------------------------------------------------------------------- watches

def test_a_watch_from_a_version_sends_only_later_events(core: k8s.CoreV1Api) -> None:
    core.create_namespaced_config_map(NS, config_map("old"))
    version = core.list_namespaced_config_map(NS).metadata.resource_version
    core.create_namespaced_config_map(NS, config_map("new"))
    core.patch_namespaced_config_map("old", NS, {"data": {"k": "w"}})
    core.delete_namespaced_config_map("new", NS)
    events = watch_events(core.list_namespaced_config_map, 3, resource_version=version)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "new"), ("MODIFIED", "old"), ("DELETED", "new")]


def test_a_watch_without_a_version_starts_with_the_current_objects(core: k8s.CoreV1Api) -> None:
    core.create_namespaced_config_map(NS, config_map("a"))
    core.create_namespaced_config_map(NS, config_map("b"))
    events = watch_events(core.list_namespaced_config_map, 2)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "a"), ("ADDED", "b")]


def test_a_watch_from_a_compacted_version_is_410(server: FakeApiServer, core: k8s.CoreV1Api) -> None:
    core.create_namespaced_config_map(NS, config_map("a"))
    version = core.list_namespaced_config_map(NS).metadata.resource_version
    server.expire_watches()
    with pytest.raises(ApiException) as info:
        watch_events(core.list_namespaced_config_map, 1, resource_version=version)
    assert info.value.status == 410


@pytest.mark.parametrize("allowed", [True, False])
def test_bookmarks_come_only_when_allowed(core: k8s.CoreV1Api, allowed: bool) -> None:
    version = core.list_namespaced_config_map(NS).metadata.resource_version
    events = watch_events(core.list_namespaced_config_map, 1, resource_version=version,
                          allow_watch_bookmarks=allowed)
    bookmarks = [e for e in events if e["type"] == "BOOKMARK"]
    if allowed:
        assert bookmarks and int(bookmarks[0]["object"]["metadata"]["resourceVersion"]) >= int(version)
    else:
        assert events == []


def test_a_watch_list_sends_the_objects_then_the_end_bookmark(core: k8s.CoreV1Api) -> None:
    core.create_namespaced_config_map(NS, config_map("a"))
    events = watch_events(core.list_namespaced_config_map, 2, send_initial_events=True,
                          resource_version_match="NotOlderThan", allow_watch_bookmarks=True)
    assert [e["type"] for e in events] == ["ADDED", "BOOKMARK"]
    assert events[0]["object"]["metadata"]["name"] == "a"
    assert events[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


def test_a_watch_is_scoped_to_its_namespace(core: k8s.CoreV1Api) -> None:
    core.create_namespace({"metadata": {"name": "other"}})
    version = core.list_namespaced_config_map(NS).metadata.resource_version
    core.create_namespaced_config_map("other", config_map("elsewhere"))
    core.create_namespaced_config_map(NS, config_map("here"))
    events = watch_events(core.list_namespaced_config_map, 1, resource_version=version)
    assert [e["object"]["metadata"]["name"] for e in events] == ["here"]


# ------------------------------------------------------------------------------ discovery, logs, errors

def test_discovery_names_the_version_groups_and_resources(api: k8s.ApiClient) -> None:
    assert k8s.VersionApi(api).get_code().git_version == "v1.33.0"
    assert k8s.CoreApi(api).get_api_versions().versions == ["v1"]
    groups = {g.name for g in k8s.ApisApi(api).get_api_versions().groups}
    assert {"apps", "batch", "networking.k8s.io", "rbac.authorization.k8s.io"} <= groups
    resources = {r.name: r for r in k8s.AppsV1Api(api).get_api_resources().resources}
    assert resources["deployments"].namespaced and resources["deployments"].kind == "Deployment"
    core = {r.name for r in k8s.CoreV1Api(api).get_api_resources().resources}
    assert {"pods", "pods/log", "secrets"} <= core


def test_an_unknown_resource_is_404(api: k8s.ApiClient) -> None:
    status, text = raw(api, "GET", f"/apis/apps/v1/namespaces/{NS}/widgets")
    assert status == 404 and "NotFound" in text


def test_pod_logs_are_served_from_the_kubelet_file(server: FakeApiServer, core: k8s.CoreV1Api,
                                                   tmp_path: Path) -> None:
    core.create_namespaced_pod(NS, pod("p"))
    assert status_of(lambda: core.read_namespaced_pod_log("p", NS)) == 400  # not started: no log yet
    log = tmp_path / "main.log"
    log.write_text("one\ntwo\n")
    server.logs[(NS, "p", "main")] = log
    assert core.read_namespaced_pod_log("p", NS) == "one\ntwo\n"
    assert core.read_namespaced_pod_log("p", NS, limit_bytes=4) == "two\n"
    assert status_of(lambda: core.read_namespaced_pod_log("p", NS, container="other")) == 400


@pytest.mark.parametrize("query", ["watch=true&resourceVersion=abc", "limit=ten", "watch=1&timeoutSeconds=soon"])
def test_a_non_numeric_parameter_is_400(api: k8s.ApiClient, query: str) -> None:
    status, text = raw(api, "GET", f"/api/v1/namespaces/{NS}/configmaps?{query}")
    assert status == 400 and "must be a number" in text
