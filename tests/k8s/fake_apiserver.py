"""A fake Kubernetes API server that stands in for a cluster in the provider's unit tests.

It is a small in-process HTTP server (``http.server`` in a thread, port 0) that implements only the
REST paths the provider uses -- create/get/replace/delete/list/watch of pods, configmaps, secrets,
persistentvolumeclaims (core v1) and networkpolicies (networking.k8s.io/v1) in namespaces -- so the
real ``kubernetes`` client runs its real code paths over HTTP. It is not Kubernetes: there is no
scheduler or kubelet (tests move pods between phases with ``set_pod_phase``), deletion is immediate,
and garbage collection is a simple cascade from an owner's uid. Created objects are checked with
kubernetes-validate in strict mode, as a real server would refuse unknown fields.
"""

from __future__ import annotations

import copy
import itertools
import json
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import kubernetes_validate

from tests.k8s.conftest import K8S_VERSION

KINDS = {
    "pods": ("v1", "Pod"),
    "configmaps": ("v1", "ConfigMap"),
    "secrets": ("v1", "Secret"),
    "persistentvolumeclaims": ("v1", "PersistentVolumeClaim"),
    "networkpolicies": ("networking.k8s.io/v1", "NetworkPolicy"),
}
Obj = dict[str, Any]


@dataclass
class Fault:
    method: str
    plural: str
    status: int
    message: str
    times: int = 1
    delay_s: float = 0.0


def status_body(code: int, reason: str, message: str) -> Obj:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def matches(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, selector.split(",")):
        key, sep, value = term.partition("=")
        if sep and labels.get(key) != value.lstrip("="):
            return False
        if not sep and key not in labels:
            return False
    return True


class FakeCluster:
    """The server's state: objects by (plural, namespace, name), an event log, and injected faults."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], Obj] = {}
        self.events: list[tuple[int, str, str, Obj]] = []  # (rv, plural, type, object)
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []
        self.cond = threading.Condition()
        self._rv = itertools.count(100)
        self.closing = False
        self.expire_watches_before = 0
        self.auto_run = False

    def next_rv(self) -> int:
        return next(self._rv)

    def record(self, plural: str, kind: str, obj: Obj) -> None:
        rv = int(obj["metadata"]["resourceVersion"])
        self.events.append((rv, plural, kind, copy.deepcopy(obj)))
        self.cond.notify_all()

    def take_fault(self, method: str, plural: str) -> Fault | None:
        for fault in self.faults:
            if fault.method == method and fault.plural == plural and fault.times > 0:
                fault.times -= 1
                return fault
        return None

    def collect_garbage(self, owner_uid: str) -> None:
        for key, obj in list(self.objects.items()):
            refs = obj["metadata"].get("ownerReferences") or []
            if any(r.get("uid") == owner_uid for r in refs):
                del self.objects[key]
                obj["metadata"]["resourceVersion"] = str(self.next_rv())
                self.record(key[0], "DELETED", obj)
                self.collect_garbage(obj["metadata"]["uid"])


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 with chunked watch streams, like the real API server (keep-alive connections).
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""
        pass

    @property
    def cluster(self) -> FakeCluster:
        return self.server.cluster

    def _send(self, code: int, body: Obj) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self) -> tuple[str, str, str | None, dict[str, list[str]]] | None:
        url = urlparse(self.path)
        parts = url.path.strip("/").split("/")
        if parts[:2] == ["api", "v1"]:
            rest = parts[2:]
        elif parts[:3] == ["apis", "networking.k8s.io", "v1"]:
            rest = parts[3:]
        else:
            return None
        if len(rest) not in (3, 4) or rest[0] != "namespaces" or rest[2] not in KINDS:
            return None
        return rest[1], rest[2], rest[3] if len(rest) == 4 else None, parse_qs(url.query)

    def _handle(self, method: str) -> None:
        route = self._route()
        if route is None:
            self._send(404, status_body(404, "NotFound", "the server could not find the requested resource"))
            return
        ns, plural, name, query = route
        # Read the body first, even when failing: a keep-alive connection must not keep stale bytes.
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        with self.cluster.cond:
            self.cluster.requests.append((method, plural))
            fault = self.cluster.take_fault(method, plural)
        if fault:
            if fault.delay_s:
                threading.Event().wait(fault.delay_s)
            reason = {403: "Forbidden", 409: "Conflict", 422: "Invalid"}.get(fault.status, "InternalError")
            self._send(fault.status, status_body(fault.status, reason, fault.message))
            return
        getattr(self, f"_{method.lower()}")(ns, plural, name, query, body)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    # ------------------------------------------------------------------------------------- verbs

    def _post(self, ns: str, plural: str, name: str | None, query: Any, body: Obj) -> None:
        try:
            kubernetes_validate.validate(body, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            self._send(422, status_body(422, "Invalid", f"invalid object: {exc.message}"))
            return
        name = body["metadata"]["name"]
        with self.cluster.cond:
            key = (plural, ns, name)
            if key in self.cluster.objects:
                msg = f'{plural} "{name}" already exists'
                self._send(409, status_body(409, "AlreadyExists", msg))
                return
            obj = copy.deepcopy(body)
            meta = obj["metadata"]
            meta.update(uid=str(uuid.uuid4()), namespace=ns, resourceVersion=str(self.cluster.next_rv()),
                        creationTimestamp=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
            if plural == "pods":
                # With auto_run, a pod is Running at once (a stand-in kubelet for scripted checks).
                obj["status"] = ({"phase": "Running", "podIP": "10.244.0.7"} if self.cluster.auto_run
                                 else {"phase": "Pending"})
            self.cluster.objects[key] = obj
            self.cluster.record(plural, "ADDED", obj)
        self._send(201, obj)

    def _put(self, ns: str, plural: str, name: str | None, query: Any, body: Obj) -> None:
        with self.cluster.cond:
            key = (plural, ns, name or "")
            current = self.cluster.objects.get(key)
            if current is None:
                self._send(404, status_body(404, "NotFound", f'{plural} "{name}" not found'))
                return
            obj = copy.deepcopy(body)
            obj["metadata"].update({k: current["metadata"][k] for k in ("uid", "creationTimestamp")},
                                   namespace=ns, resourceVersion=str(self.cluster.next_rv()))
            self.cluster.objects[key] = obj
            self.cluster.record(plural, "MODIFIED", obj)
        self._send(200, obj)

    def _delete(self, ns: str, plural: str, name: str | None, query: Any, body: Obj | None) -> None:
        with self.cluster.cond:
            obj = self.cluster.objects.pop((plural, ns, name or ""), None)
            if obj is None:
                self._send(404, status_body(404, "NotFound", f'{plural} "{name}" not found'))
                return
            obj["metadata"]["resourceVersion"] = str(self.cluster.next_rv())
            self.cluster.record(plural, "DELETED", obj)
            self.cluster.collect_garbage(obj["metadata"]["uid"])
        self._send(200, obj)

    def _get(self, ns: str, plural: str, name: str | None, query: dict[str, list[str]], body: Any) -> None:
        if name:
            with self.cluster.cond:
                obj = self.cluster.objects.get((plural, ns, name))
            if obj is None:
                self._send(404, status_body(404, "NotFound", f'{plural} "{name}" not found'))
            else:
                self._send(200, obj)
            return
        selector = query.get("labelSelector", [""])[0]
        if query.get("watch", ["false"])[0] in ("true", "1", "True"):
            self._watch(ns, plural, selector, query)
            return
        api_version, kind = KINDS[plural]
        with self.cluster.cond:
            items = [copy.deepcopy(o) for (p, n, _), o in sorted(self.cluster.objects.items())
                     if p == plural and n == ns and matches(o["metadata"].get("labels", {}), selector)]
            rv = str(self.cluster.next_rv())
        self._send(200, {"apiVersion": api_version, "kind": f"{kind}List",
                         "metadata": {"resourceVersion": rv}, "items": items})

    def _watch(self, ns: str, plural: str, selector: str, query: dict[str, list[str]]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            self._stream(ns, plural, selector, query)
            self._chunk(b"")
        except OSError:
            self.close_connection = True

    def _stream(self, ns: str, plural: str, selector: str, query: dict[str, list[str]]) -> None:
        since = int(query.get("resourceVersion", ["0"])[0] or 0)
        deadline = time.monotonic() + float(query.get("timeoutSeconds", ["30"])[0])
        with self.cluster.cond:
            if since < self.cluster.expire_watches_before:
                gone = status_body(410, "Expired", "too old resource version")
                self._line({"type": "ERROR", "object": gone})
                return
        while time.monotonic() < deadline:
            with self.cluster.cond:
                pending = [(rv, t, o) for rv, p, t, o in self.cluster.events
                           if p == plural and rv > since and o["metadata"].get("namespace") == ns
                           and matches(o["metadata"].get("labels", {}), selector)]
                if not pending:
                    if self.cluster.closing:
                        return
                    self.cluster.cond.wait(0.05)
                    continue
            for rv, kind, obj in pending:
                self._line({"type": kind, "object": obj})
                since = rv

    def _line(self, event: Obj) -> None:
        self._chunk(json.dumps(event).encode() + b"\n")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    cluster: FakeCluster

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up mid-response (a stopped watch, a timed-out call) is expected here."""


class FakeApiServer:
    """Start with ``with FakeApiServer() as server:``; ``server.url`` is the base URL for the client."""

    def __init__(self, *, auto_run: bool = False) -> None:
        self.cluster = FakeCluster()
        self.cluster.auto_run = auto_run
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.cluster = self.cluster
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-apiserver", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> FakeApiServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self.cluster.cond:
            self.cluster.closing = True
            self.cluster.cond.notify_all()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    # ------------------------------------------------------------------------------ test controls

    def get(self, plural: str, ns: str, name: str) -> Obj | None:
        with self.cluster.cond:
            obj = self.cluster.objects.get((plural, ns, name))
            return copy.deepcopy(obj) if obj else None

    def names(self, plural: str, ns: str) -> list[str]:
        with self.cluster.cond:
            return sorted(n for p, s, n in self.cluster.objects if p == plural and s == ns)

    def fail(self, method: str, plural: str, status: int, message: str = "injected", *, times: int = 1,
             delay_s: float = 0.0) -> None:
        with self.cluster.cond:
            self.cluster.faults.append(Fault(method, plural, status, message, times, delay_s))

    def set_pod_phase(self, ns: str, name: str, phase: str, ip: str | None = None, **status: Any) -> None:
        with self.cluster.cond:
            pod = self.cluster.objects[("pods", ns, name)]
            pod["status"] = {"phase": phase, **({"podIP": ip} if ip else {}), **status}
            pod["metadata"]["resourceVersion"] = str(self.cluster.next_rv())
            self.cluster.record("pods", "MODIFIED", pod)

    def expire_watches(self) -> None:
        """Make the next watch from an older resourceVersion get 410 Gone, as etcd compaction does."""
        with self.cluster.cond:
            self.cluster.expire_watches_before = self.cluster.next_rv()

    def count(self, method: str, plural: str) -> int:
        with self.cluster.cond:
            return sum(1 for m, p in self.cluster.requests if (m, p) == (method, plural))
