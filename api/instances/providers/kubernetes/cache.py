"""Watch-backed caches of the session objects, so status polls and reconciles cost no API calls.

One daemon thread per cache lists the objects matching the provider's label selector, a page at a time
(``limit``/``continue``, so 10,000 sessions are never one response), then watches from the list's
resourceVersion. When the watch ends (server timeout) it resumes from the last version seen; when the
version is too old (410 Gone) or the connection fails it lists again, after a short backoff. The thread
uses the official client's sync ``Watch`` without building model objects; the async provider only
reads the dict. Each object is kept slim: only the fields the provider reads (``slim_pod``,
``slim_root``), which is what keeps a scheduler with 10,000 sessions far inside its memory limit.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from kubernetes import watch
from kubernetes.client import CoreV1Api
from kubernetes.client.exceptions import ApiException

from api.instances.providers.kubernetes.errors import failure

log = logging.getLogger(__name__)

Pod = dict[str, Any]
Slim = Callable[[Pod], Pod]
PAGE_SIZE = 500
ANNOTATION_PREFIX = "orz.cloud/"


def slim_pod(pod: Pod) -> Pod:
    """What the provider and its status mapping read of a Pod (api/instances/providers/kubernetes/status.py)."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    slim_meta = {k: meta[k] for k in ("name", "resourceVersion", "deletionTimestamp") if k in meta}
    slim_meta["labels"] = {k: v for k, v in (meta.get("labels") or {}).items() if k.startswith(ANNOTATION_PREFIX)}
    slim_meta["annotations"] = {k: v for k, v in (meta.get("annotations") or {}).items()
                                if k.startswith(ANNOTATION_PREFIX)}
    slim_status: Pod = {k: status[k] for k in ("phase", "reason", "podIP") if k in status}
    if "conditions" in status:
        slim_status["conditions"] = [{k: c.get(k) for k in ("type", "status", "reason")}
                                     for c in status.get("conditions") or []]
    if "containerStatuses" in status:
        slim_status["containerStatuses"] = [
            {"name": cs.get("name"), "ready": cs.get("ready"),
             "state": {"waiting": {"reason": ((cs.get("state") or {}).get("waiting") or {}).get("reason")}}
             if (cs.get("state") or {}).get("waiting") else {},
             **_slim_oom(cs)}
            for cs in status.get("containerStatuses") or []]
    # An evicted Pod's message says what filled up, and the mounts say where that is in the session; only
    # evicted Pods (which the provider deletes at once) keep them.
    evicted = status.get("reason") == "Evicted"
    if evicted and status.get("message"):
        slim_status["message"] = str(status["message"])[:500]
    containers = []
    for c in (pod.get("spec") or {}).get("containers") or []:
        memory = ((c.get("resources") or {}).get("limits") or {}).get("memory")
        containers.append({"name": c.get("name"), **({"resources": {"limits": {"memory": memory}}} if memory else {}),
                           **({"volumeMounts": [{"name": m.get("name"), "mountPath": m.get("mountPath")}
                                                for m in c.get("volumeMounts") or []]} if evicted else {})})
    return {"metadata": slim_meta, "spec": {"containers": containers}, "status": slim_status}


def _slim_oom(container_status: Pod) -> Pod:
    """A container's last termination, only when the OOM killer ended it (the user is told, once per kill)."""
    last = ((container_status.get("lastState") or {}).get("terminated")) or {}
    if last.get("reason") != "OOMKilled":
        return {}
    return {"lastState": {"terminated": {"reason": "OOMKilled", "finishedAt": last.get("finishedAt")}}}


def slim_root(config_map: Pod) -> Pod:
    """A session's root ConfigMap: its name, version and which session it holds."""
    meta = config_map.get("metadata") or {}
    return {"metadata": {"name": meta.get("name"), "resourceVersion": meta.get("resourceVersion"),
                         "labels": {k: v for k, v in (meta.get("labels") or {}).items()
                                    if k.startswith(ANNOTATION_PREFIX)}},
            "data": {"session": (config_map.get("data") or {}).get("session")}}


class WatchCache:
    """One kind of object in one namespace, listed then watched (see the module docstring)."""

    def __init__(self, list_fn: Callable[..., Any], namespace: str, selector: str, *, slim: Slim,
                 what: str, watch_timeout_s: int = 240, request_timeout_s: float = 30.0, backoff_s: float = 1.0,
                 page_size: int = PAGE_SIZE) -> None:
        self._list = list_fn
        self._slim = slim
        self._what = what
        self._page_size = page_size
        self._namespace = namespace
        self._selector = selector
        self._watch_timeout_s = watch_timeout_s
        self._request_timeout_s = request_timeout_s
        self._backoff_s = backoff_s
        self._pods: dict[str, Pod] = {}
        self._lock = threading.Lock()
        self._synced = threading.Event()
        # Set after the first list attempt, success or not, so callers never wait out a broken API.
        self._settled = threading.Event()
        self.last_error: str | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: watch.Watch | None = None
        # Counts full lists (and their pages), so tests can tell a resumed watch from a relist.
        self.lists = 0
        self.pages = 0

    # ------------------------------------------------------------------------------------------ reads

    def get(self, name: str) -> Pod | None:
        with self._lock:
            pod = self._pods.get(name)
            return copy.deepcopy(pod) if pod else None

    def items(self) -> list[Pod]:
        """Every cached object, read-only: entries are replaced whole, never changed in place."""
        with self._lock:
            return list(self._pods.values())

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    def wait_synced(self, timeout: float) -> bool:
        self._settled.wait(timeout)
        return self._synced.is_set()

    # ----------------------------------------------------------------------------------------- writes

    def upsert(self, pod: Pod) -> None:
        """Record an object the provider just wrote, so a status right after create sees it."""
        name = pod.get("metadata", {}).get("name")
        if not name:
            return
        pod = self._slim(pod)
        with self._lock:
            current = self._pods.get(name)
            if current is None or _rv(pod) >= _rv(current):
                self._pods[name] = pod

    def discard(self, name: str) -> None:
        with self._lock:
            self._pods.pop(name, None)

    # -------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"orz-k8s-watch-{self._what}", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        current = self._watch
        if current is not None:
            current.stop()
            # Watch.stop() can only unblock a read on a kept-alive socket; urllib3's shutdown() also
            # ends a read on a close-delimited response, so close() never waits out a quiet watch.
            response = getattr(current, "_resp", None)
            if response is not None and hasattr(response, "shutdown"):
                try:
                    response.shutdown()
                except Exception as exc:
                    log.debug("pod watch shutdown: %s", type(exc).__name__)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                version = self._relist()
                while not self._stopping.is_set():
                    version = self._watch_once(version)
            except Exception as exc:
                # 410 Gone: our resourceVersion is too old; anything else: the API is unwell. Relist.
                if self._stopping.is_set():
                    pass
                elif isinstance(exc, ApiException) and exc.status == 410:
                    log.info("%s watch: resourceVersion expired; listing again", self._what)
                else:
                    self.last_error = failure(exc, f"watch session {self._what}", self._namespace).reason
                    log.warning("%s watch: %s; listing again", self._what, self.last_error)
            finally:
                self._settled.set()
            self._stopping.wait(self._backoff_s)

    def _relist(self) -> str:
        pods: dict[str, Pod] = {}
        token: str | None = None
        version = ""
        while True:
            response = self._list(
                self._namespace, label_selector=self._selector, limit=self._page_size, _continue=token,
                _preload_content=False, _request_timeout=self._request_timeout_s,
            )
            body = json.loads(response.data)
            self.pages += 1
            for item in body.get("items") or []:
                pods[item["metadata"]["name"]] = self._slim(item)
            meta = body.get("metadata") or {}
            version = str(meta.get("resourceVersion") or version)
            token = meta.get("continue") or None
            if token is None:
                break
        with self._lock:
            self._pods = pods
        self.lists += 1
        self.last_error = None
        self._synced.set()
        self._settled.set()
        return version

    def _watch_once(self, version: str) -> str:
        """Stream events until the server closes the watch; returns the last resourceVersion seen."""
        # object as the return type: events stay plain JSON (no model objects built for each one).
        self._watch = watch.Watch(return_type=object)
        try:
            stream = self._watch.stream(
                self._list, self._namespace, label_selector=self._selector,
                resource_version=version, allow_watch_bookmarks=True,
                timeout_seconds=self._watch_timeout_s,
                # The read timeout sits past the server-side one so a quiet watch is not an error.
                _request_timeout=(self._request_timeout_s, self._watch_timeout_s + 15),
            )
            for event in stream:
                raw: Pod = event.get("raw_object") or {}
                version = str(raw.get("metadata", {}).get("resourceVersion") or version)
                kind = event.get("type")
                name = raw.get("metadata", {}).get("name")
                if kind in ("ADDED", "MODIFIED") and name:
                    slim = self._slim(raw)
                    with self._lock:
                        self._pods[name] = slim
                elif kind == "DELETED" and name:
                    with self._lock:
                        self._pods.pop(name, None)
        finally:
            self._watch = None
        return version


class PodCache(WatchCache):
    """The session Pods (status comes from here)."""

    def __init__(self, core: CoreV1Api, namespace: str, selector: str, **options: Any) -> None:
        super().__init__(core.list_namespaced_pod, namespace, selector, slim=slim_pod, what="pods", **options)


class RootCache(WatchCache):
    """The sessions' root ConfigMaps (a session with a kept workspace has one)."""

    def __init__(self, core: CoreV1Api, namespace: str, selector: str, **options: Any) -> None:
        super().__init__(core.list_namespaced_config_map, namespace, selector, slim=slim_root, what="roots",
                         **options)


def _rv(pod: Pod) -> int:
    try:
        return int(pod.get("metadata", {}).get("resourceVersion") or 0)
    except ValueError:
        # resourceVersions are opaque; when not a number, the newest write wins.
        return 1 << 62
