"""A Kubernetes API server stand-in over real HTTP(S), so the official client runs its real code paths.

It serves the REST paths of the kinds in ``rehearsal.kinds`` (core, apps, batch, networking, policy,
rbac, coordination and two Prometheus Operator kinds): create, get, list (with label/field selectors and
pagination), watch (with bookmarks), replace, merge patch, the ``status`` subresource, delete (with grace
periods, finalizers and propagation), pod logs, ``/version`` and discovery. The semantics live in
``rehearsal.store``. With ``tls=True`` it serves HTTPS with a CA of its own (what in-cluster clients
expect), and with an ``authorizer`` it checks each request's bearer token against RBAC.

The provider's unit tests use it without a kubelet (tests move pods with ``set_pod_phase``); the rehearsal
runs it with the process kubelet (``rehearsal.kubelet``) and controllers.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from rehearsal.kinds import BY_PLURAL, K8S_VERSION, KINDS, Kind
from rehearsal.store import ApiError, Fault, Obj, Store, status_body

# (verb, group, plural, subresource, namespace, name, token) -> None or raises ApiError(403)
Authorizer = Callable[[str, str, str, str, str, str, str], None]
# (namespace, pod, container, argv) -> what the command printed and its exit status (the kubelet's exec)
ExecHandler = Callable[[str, str, str, list[str]], "subprocess.CompletedProcess[bytes]"]
STREAMS = ("exec", "portforward")


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 with chunked watch streams, like the real API server (keep-alive connections).
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the rehearsal and the tests print what matters."""

    @property
    def store(self) -> Store:
        return self.server.api.store

    # ------------------------------------------------------------------------------------ output

    def _send(self, code: int, body: Obj | str, content_type: str = "application/json") -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _fail(self, error: ApiError) -> None:
        self._send(error.code, error.status())

    # ------------------------------------------------------------------------------------ routing

    def _parse(self) -> tuple[Kind, str | None, str, str, dict[str, list[str]]] | str:
        """(kind, namespace or None, name, subresource, query), or the name of a non-resource path."""
        url = urlparse(self.path)
        parts = [p for p in url.path.split("/") if p]
        query = parse_qs(url.query)
        if parts in (["version"], ["api"], ["apis"]) or (len(parts) == 2 and parts[0] == "api") or \
                (len(parts) == 3 and parts[0] == "apis"):
            return "/".join(parts)
        if parts[:1] == ["api"] and len(parts) > 2:
            group, rest = "", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) > 3:
            group, rest = parts[1], parts[3:]
        else:
            raise ApiError(404, "the server could not find the requested resource")
        namespace: str | None = None
        if rest[0] == "namespaces" and len(rest) >= 3 and (group, rest[2]) in BY_PLURAL:
            namespace, rest = rest[1], rest[2:]
        if (group, rest[0]) not in BY_PLURAL:
            raise ApiError(404, "the server could not find the requested resource")
        kind = BY_PLURAL[(group, rest[0])]
        name = rest[1] if len(rest) > 1 else ""
        sub = rest[2] if len(rest) > 2 else ""
        if not kind.namespaced:
            namespace = ""
        return kind, namespace, name, sub, query

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None
        try:
            if (self.headers.get("Content-Type") or "").startswith("application/vnd.kubernetes.protobuf"):
                from rehearsal.protobuf import decode

                return decode(raw)
            if (self.headers.get("Content-Type") or "").startswith("application/apply-patch+yaml"):
                from ruamel.yaml import YAML

                return json.loads(json.dumps(YAML(typ="safe").load(raw)))
            return json.loads(raw)
        except ValueError:
            raise ApiError(400, f"the request body is not JSON ({self.headers.get('Content-Type')})") from None

    def _handle(self, method: str) -> None:
        try:
            # Read the body first, even when failing: a keep-alive connection must not keep stale bytes.
            body = self._body() if method in ("POST", "PUT", "PATCH", "DELETE") else None
            if self.path.split("?")[0] == "/openapi/v2":
                # An empty OpenAPI document (zero protobuf bytes): clients then leave schema checks to us,
                # and this server validates every object strictly itself.
                self._send(200, "", "application/octet-stream")
                return
            route = self._parse()
            if isinstance(route, str):
                self._send(200, self.server.api.discovery(route))
                return
            kind, namespace, name, sub, query = route
            fault = self.store.take_fault(method, kind.plural)
            if self.server.api.trace is not None:
                self.server.api.trace.append(f"{method} {self.path}")
            if fault:
                if fault.delay_s:
                    threading.Event().wait(fault.delay_s)
                raise ApiError(fault.status, fault.message)
            verb = self._verb(method, name, query, sub)
            authorize = self.server.api.authorizer
            if authorize is not None:
                scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
                token = token.strip() if scheme.lower() == "bearer" else ""
                authorize(verb, kind.group, kind.plural, sub, namespace or "", name, token)
            getattr(self, f"_{method.lower()}")(kind, namespace, name, sub, query, body)
        except ApiError as error:
            self._fail(error)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    @staticmethod
    def _verb(method: str, name: str, query: dict[str, list[str]], sub: str = "") -> str:
        if sub in STREAMS:
            return "create"  # what the API server checks for pods/exec and pods/portforward, GET or POST
        if method == "GET":
            if query.get("watch", ["false"])[0] in ("true", "1", "True"):
                return "watch"
            return "get" if name else "list"
        return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    # -------------------------------------------------------------------------------------- verbs

    def _post(self, kind: Kind, ns: str | None, name: str, sub: str, query: Any, body: Obj) -> None:
        if name or (ns is None and kind.namespaced):
            raise ApiError(405, "create goes to the collection of a namespace")
        if isinstance(body, dict) and kind.namespaced:
            body_ns = (body.get("metadata") or {}).get("namespace")
            if body_ns and body_ns != ns:
                raise ApiError(400, "the namespace of the object does not match the namespace on the URL")
        self._send(201, self.store.create(kind.plural, ns or "", body))

    def _put(self, kind: Kind, ns: str | None, name: str, sub: str, query: Any, body: Obj) -> None:
        self._send(200, self.store.replace(kind.plural, ns or "", name, body, sub))

    def _patch(self, kind: Kind, ns: str | None, name: str, sub: str, query: Any, body: Obj) -> None:
        content_type = (self.headers.get("Content-Type") or "").split(";")[0]
        if content_type == "application/apply-patch+yaml":
            # Server-side apply, approximated: create when missing, else merge the applied fields in.
            self._send(200, self.store.apply(kind.plural, ns or "", name, body or {}, sub))
            return
        if content_type not in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            raise ApiError(415, f"the rehearsal's API server does not take {content_type} patches")
        self._send(200, self.store.patch(kind.plural, ns or "", name, body or {}, sub))

    def _delete(self, kind: Kind, ns: str | None, name: str, sub: str, query: dict[str, list[str]],
                body: Obj | None) -> None:
        options = body or {}
        grace = options.get("gracePeriodSeconds", _first(query, "gracePeriodSeconds"))
        propagation = options.get("propagationPolicy") or _first(query, "propagationPolicy") or "Background"
        if options.get("orphanDependents") is True:
            propagation = "Orphan"
        self._send(200, self.store.delete(kind.plural, ns or "", name,
                                          grace_s=None if grace in (None, "") else int(grace),
                                          propagation=propagation))

    def _get(self, kind: Kind, ns: str | None, name: str, sub: str, query: dict[str, list[str]],
             body: Any) -> None:
        if name and sub == "log":
            self._send(200, self.server.api.pod_log(ns or "", name, query), "text/plain")
            return
        if name and kind.plural == "pods" and sub in STREAMS:
            self._stream(ns or "", name, sub, query)
            return
        if name:
            self._send(200, self.store.get(kind.plural, ns or "", name))
            return
        selector = _first(query, "labelSelector") or ""
        if self._verb("GET", name, query) == "watch":
            since = _number(query, "resourceVersion", int)
            timeout = _number(query, "timeoutSeconds", float) or 1800
            bookmarks = _first(query, "allowWatchBookmarks") in ("true", "1")
            initial = _first(query, "sendInitialEvents") in ("true", "1")
            self._watch(self.store.watch(kind.plural, ns, selector, since, timeout, bookmarks,
                                         self.server.api.bookmark_every_s, initial_events=initial))
            return
        items, rv, more = self.store.list(kind.plural, ns, selector, _first(query, "fieldSelector") or "",
                                          _number(query, "limit", int), _first(query, "continue") or "")
        metadata: Obj = {"resourceVersion": rv}
        if more:
            metadata["continue"] = more
        self._send(200, {"apiVersion": kind.api_version, "kind": f"{kind.kind}List", "metadata": metadata,
                         "items": items})

    def _stream(self, ns: str, name: str, sub: str, query: dict[str, list[str]]) -> None:
        """exec or port-forward over a WebSocket upgrade (rehearsal.streams)."""
        from rehearsal import streams

        pod = self.store.get("pods", ns, name)
        key = self.headers.get("Sec-WebSocket-Key")
        if (self.headers.get("Upgrade") or "").lower() != "websocket" or not key:
            raise ApiError(400, f"pods/{sub} is served over WebSocket here (no SPDY)")
        if sub == "exec":
            containers = [c["name"] for c in pod["spec"]["containers"]]
            container = _first(query, "container") or containers[0]
            argv = query.get("command") or []
            if container not in containers or not argv:
                raise ApiError(400, f"exec needs a command and one of the containers {containers}")
            if _first(query, "stdin") in ("true", "1"):
                raise ApiError(400, "the rehearsal's exec takes no stdin")
            run_exec = self.server.api.exec_handler
            if run_exec is None:
                raise ApiError(400, "no kubelet runs this pod's containers")
        else:
            ports = [int(p) for value in query.get("ports", []) for p in value.split(",") if p.strip().isdigit()]
            ip = (pod.get("status") or {}).get("podIP")
            if len(ports) != 1 or not ip:
                raise ApiError(400, "port-forward takes one port, to a pod that has an IP")
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", streams.accept_key(key))
        self.send_header("Sec-WebSocket-Protocol", streams.CHANNEL_PROTOCOL)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        try:
            if sub == "exec":
                try:
                    done = run_exec(ns, name, container, argv)
                except RuntimeError as exc:  # the container is not running (any more)
                    done = subprocess.CompletedProcess(argv, 1, b"", f"{exc}\n".encode())
                streams.exec_result(self.connection, done)
            else:
                streams.forward(self.connection, (ip, ports[0]), ports[0])
        except OSError:
            pass

    def _watch(self, events: Any) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for event in events:
                self._chunk(json.dumps(event).encode() + b"\n")
            self._chunk(b"")
        except OSError:
            self.close_connection = True

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def _first(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    return values[0] if values else None


def _number(query: dict[str, list[str]], key: str, kind: Callable[[str], Any]) -> Any:
    """A numeric query parameter (0 when absent); 400 when it is not a number."""
    try:
        return kind(_first(query, key) or 0)
    except ValueError:
        raise ApiError(400, f"{key} must be a number") from None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    api: FakeApiServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up mid-response (a stopped watch, a timed-out call) is expected here."""


class FakeApiServer:
    """Start with ``with FakeApiServer() as server:``; ``server.url`` is the base URL for the client."""

    def __init__(self, *, auto_run: bool = False, host: str = "127.0.0.1", port: int = 0, tls: bool = False,
                 tls_dir: Path | None = None, store: Store | None = None, authorizer: Authorizer | None = None,
                 bookmark_every_s: float = 5.0) -> None:
        self.store = store or Store(auto_run=auto_run)
        self.trace: list[str] | None = None  # every request line, when a caller wants to see them
        self.authorizer = authorizer
        self.exec_handler: ExecHandler | None = None  # set by whoever runs the pods (the rehearsal's kubelet)
        self.bookmark_every_s = bookmark_every_s
        # (namespace, pod, container) -> log file, filled in by the kubelet.
        self.logs: dict[tuple[str, str, str], Path] = {}
        self._httpd = _Server((host, port), _Handler)
        self._httpd.api = self
        self.ca_file: Path | None = None
        if tls:
            from rehearsal.certs import serving_certificate

            assert tls_dir is not None, "tls needs a directory for the CA and key"
            ca, cert, key = serving_certificate(tls_dir, [host, "127.0.0.1"])
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
            self.ca_file = ca
        self._scheme = "https" if tls else "http"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-apiserver", daemon=True)

    @property
    def cluster(self) -> Store:
        """The store (the older tests' name for it)."""
        return self.store

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"{self._scheme}://{host}:{port}"

    def __enter__(self) -> FakeApiServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.store.close()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    # ------------------------------------------------------------------------------ non-resources

    def discovery(self, path: str) -> Obj:
        if path == "version":
            major, minor, _ = K8S_VERSION.split(".")
            # Every field the real server sends: the official Python client refuses a VersionInfo without them.
            return {"major": major, "minor": minor, "gitVersion": f"v{K8S_VERSION}", "gitCommit": "rehearsal",
                    "gitTreeState": "clean", "buildDate": "1970-01-01T00:00:00Z", "goVersion": "go1.24",
                    "compiler": "gc", "platform": "linux/amd64"}
        if path == "api":
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        if path == "apis":
            groups: dict[str, str] = {k.group: k.version for k in KINDS if k.group}
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
                 "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v}} for g, v in sorted(groups.items())]}
        parts = path.split("/")
        group_version = parts[1] if parts[0] == "api" else f"{parts[1]}/{parts[2]}"
        resources = []
        for k in KINDS:
            if k.api_version != group_version:
                continue
            verbs = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
            resources.append({"name": k.plural, "singularName": k.singular, "namespaced": k.namespaced,
                              "kind": k.kind, "verbs": verbs})
            if k.plural == "pods":
                resources.append({"name": "pods/log", "singularName": "", "namespaced": True, "kind": "Pod",
                                  "verbs": ["get"]})
                resources.extend({"name": f"pods/{sub}", "singularName": "", "namespaced": True, "kind":
                                  "PodExecOptions" if sub == "exec" else "PodPortForwardOptions",
                                  "verbs": ["create", "get"]} for sub in STREAMS)
        if not resources:
            raise ApiError(404, "the server could not find the requested resource")
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
                "resources": resources}

    def pod_log(self, namespace: str, name: str, query: dict[str, list[str]]) -> str:
        pod = self.store.get("pods", namespace, name)
        containers = [c["name"] for c in pod["spec"]["containers"]]
        container = _first(query, "container") or (containers[0] if len(containers) == 1 else "")
        if container not in containers:
            raise ApiError(400, f"a container name must be specified for pod {name}, choose one of: {containers}")
        path = self.logs.get((namespace, name, container))
        if path is None or not path.exists():
            raise ApiError(400, f'container "{container}" in pod "{name}" is waiting to start')
        data = path.read_bytes()
        limit = int(_first(query, "limitBytes") or 0)
        if limit:
            data = data[-limit:]
        return data.decode(errors="replace")

    # ------------------------------------------------------------------------------ test controls

    def get(self, plural: str, ns: str, name: str) -> Obj | None:
        return self.store.find(plural, ns, name)

    def names(self, plural: str, ns: str) -> list[str]:
        items, _, _ = self.store.list(plural, ns)
        return [item["metadata"]["name"] for item in items]

    def fail(self, method: str, plural: str, status: int, message: str = "injected", *, times: int = 1,
             delay_s: float = 0.0) -> None:
        with self.store.cond:
            self.store.faults.append(Fault(method, plural, status, message, times, delay_s))

    def set_pod_phase(self, ns: str, name: str, phase: str, ip: str | None = None, **status: Any) -> None:
        pod = self.store.get("pods", ns, name)
        self.store.replace("pods", ns, name, {**pod, "status": {"phase": phase, **({"podIP": ip} if ip else {}),
                                                               **status}}, "status")

    def expire_watches(self) -> None:
        """Make the next watch from an older resourceVersion get 410 Gone, as etcd compaction does."""
        with self.store.cond:
            self.store.expire_watches_before = self.store.next_rv()

    def count(self, method: str, plural: str) -> int:
        with self.store.cond:
            return sum(1 for m, p in self.store.requests if (m, p) == (method, plural))

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.05)
        return predicate()


__all__ = ["ApiError", "FakeApiServer", "Store", "status_body"]
