"""A watch-backed cache of the session pods, so status polls cost no API calls.

One daemon thread lists the pods matching the provider's label selector once, then watches from the
list's resourceVersion. When the watch ends (server timeout) it resumes from the last version seen;
when the version is too old (410 Gone) or the connection fails it lists again, after a short backoff.
The thread uses the official client's sync ``Watch``; the async provider only reads the dict.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from typing import Any

from kubernetes import watch
from kubernetes.client import CoreV1Api
from kubernetes.client.exceptions import ApiException

from api.instances.providers.kubernetes.errors import failure

log = logging.getLogger(__name__)

Pod = dict[str, Any]


class PodCache:
    def __init__(self, core: CoreV1Api, namespace: str, selector: str, *, watch_timeout_s: int = 240,
                 request_timeout_s: float = 30.0, backoff_s: float = 1.0) -> None:
        self._core = core
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
        # Counts full lists, so tests can tell a resumed watch from a relist.
        self.lists = 0

    # ------------------------------------------------------------------------------------------ reads

    def get(self, name: str) -> Pod | None:
        with self._lock:
            pod = self._pods.get(name)
            return copy.deepcopy(pod) if pod else None

    def pods(self) -> list[Pod]:
        with self._lock:
            return [copy.deepcopy(p) for p in self._pods.values()]

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    def wait_synced(self, timeout: float) -> bool:
        self._settled.wait(timeout)
        return self._synced.is_set()

    # ----------------------------------------------------------------------------------------- writes

    def upsert(self, pod: Pod) -> None:
        """Record a pod the provider just wrote, so a status right after create sees it."""
        name = pod.get("metadata", {}).get("name")
        if not name:
            return
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
            self._thread = threading.Thread(target=self._run, name="orz-k8s-pod-watch", daemon=True)
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
                    log.info("pod watch: resourceVersion expired; listing again")
                else:
                    self.last_error = failure(exc, "watch session pods", self._namespace).reason
                    log.warning("pod watch: %s; listing again", self.last_error)
            finally:
                self._settled.set()
            self._stopping.wait(self._backoff_s)

    def _relist(self) -> str:
        response = self._core.list_namespaced_pod(
            self._namespace, label_selector=self._selector, _preload_content=False,
            _request_timeout=self._request_timeout_s,
        )
        body = json.loads(response.data)
        pods = {p["metadata"]["name"]: p for p in body.get("items") or []}
        with self._lock:
            self._pods = pods
        self.lists += 1
        self.last_error = None
        self._synced.set()
        self._settled.set()
        return str(body.get("metadata", {}).get("resourceVersion") or "")

    def _watch_once(self, version: str) -> str:
        """Stream events until the server closes the watch; returns the last resourceVersion seen."""
        self._watch = watch.Watch()
        try:
            stream = self._watch.stream(
                self._core.list_namespaced_pod, self._namespace, label_selector=self._selector,
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
                    with self._lock:
                        self._pods[name] = raw
                elif kind == "DELETED" and name:
                    with self._lock:
                        self._pods.pop(name, None)
        finally:
            self._watch = None
        return version


def _rv(pod: Pod) -> int:
    try:
        return int(pod.get("metadata", {}).get("resourceVersion") or 0)
    except ValueError:
        # resourceVersions are opaque; when not a number, the newest write wins.
        return 1 << 62
