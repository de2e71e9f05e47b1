"""The object store behind the rehearsal's API server, with the semantics clients depend on.

What a real API server does and clients notice, kept here: strict validation against the Kubernetes
schema on create and replace; resourceVersion on every write and 409 Conflict for a stale one;
``generation`` bumped only by spec changes; status kept apart from the main resource (a PUT of the object
never overwrites status, a PUT of ``/status`` changes only status); graceful deletion (``deletionTimestamp``
and a grace period for pods, finalizers for everything) and asynchronous garbage collection of dependents
by ownerReferences, with Background, Foreground and Orphan propagation; namespaces that must exist and that
delete their content; list pagination (``limit``/``continue``); watches from a resourceVersion with
BOOKMARK events and 410 Gone once the event log is compacted; label selectors with set-based terms.
It is not etcd: one process, in memory, one lock.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import ipaddress
import itertools
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kubernetes_validate

from rehearsal import selectors
from rehearsal.kinds import K8S_VERSION, PLURALS, Kind

Obj = dict[str, Any]
Key = tuple[str, str, str]  # (plural, namespace or "", name)

# Kinds whose status is a subresource: a write of the object keeps the stored status.
STATUS_SUBRESOURCE = frozenset({"pods", "deployments", "replicasets", "statefulsets", "daemonsets", "jobs",
                                "services", "persistentvolumeclaims", "namespaces", "poddisruptionbudgets",
                                "ingresses"})
MAX_EVENTS = 20_000
# Object names the API server checks before anything else (apimachinery's validation of metadata.name).
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL_NAMED = frozenset({"namespaces", "services"})
SUBDOMAIN_NAMED = frozenset({"pods", "configmaps", "secrets", "serviceaccounts", "persistentvolumeclaims",
                             "deployments", "statefulsets", "daemonsets", "replicasets", "jobs"})


class ApiError(Exception):
    """A failure the API server answers with a Status object."""

    REASONS = {400: "BadRequest", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed",
               409: "Conflict", 410: "Expired", 415: "UnsupportedMediaType", 422: "Invalid",
               500: "InternalError"}

    def __init__(self, code: int, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or self.REASONS.get(code, "Unknown")

    def status(self) -> Obj:
        return status_body(self.code, self.reason, self.message)


def status_body(code: int, reason: str, message: str) -> Obj:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def now_rfc3339(offset_s: float = 0.0) -> str:
    return datetime.fromtimestamp(time.time() + offset_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (also used, as an approximation, for strategic merge patches)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


@dataclass
class Fault:
    """An injected failure: the next `times` matching requests answer `status` (after `delay_s`)."""

    method: str
    plural: str
    status: int
    message: str
    times: int = 1
    delay_s: float = 0.0


@dataclass
class Store:
    """All objects, the event log and the controls tests use. Every method takes the lock itself."""

    validate: bool = True
    # The rehearsal wants namespaces to exist before their content, as a real server does; the provider's
    # unit tests create pods in a namespace nobody made.
    require_namespaces: bool = False
    # Without a kubelet, terminating pods are removed after this long (it stands in for the kubelet
    # reporting the containers gone). None: a kubelet finishes the deletion.
    pod_termination_s: float | None = 0.2
    # Pods go Running with an IP at once (a stand-in kubelet for scripted checks).
    auto_run: bool = False
    service_cidr: str = "10.96.0.0/16"
    objects: dict[Key, Obj] = field(default_factory=dict)
    events: list[tuple[int, str, str, Obj]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)
    expire_watches_before: int = 0
    closing: bool = False

    def __post_init__(self) -> None:
        self.cond = threading.Condition()
        self._rv = itertools.count(100)
        self._last_rv = 99
        self._gc_queue: list[tuple[str, str]] = []  # (owner uid, propagation)
        self._terminating: dict[Key, float] = {}  # pods waiting for pod_termination_s
        net = ipaddress.ip_network(self.service_cidr)
        self._cluster_ips = (str(ip) for ip in itertools.islice(net.hosts(), 10, None))
        self._thread = threading.Thread(target=self._background, name="fake-apiserver-gc", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------ plumbing

    def next_rv(self) -> int:
        self._last_rv = next(self._rv)
        return self._last_rv

    @property
    def resource_version(self) -> int:
        return self._last_rv

    def _record(self, plural: str, kind: str, obj: Obj) -> None:
        self.events.append((int(obj["metadata"]["resourceVersion"]), plural, kind, copy.deepcopy(obj)))
        if len(self.events) > MAX_EVENTS:
            # Compaction: watches from before the oldest kept event get 410 Gone, as from etcd.
            drop = len(self.events) - MAX_EVENTS // 2
            self.expire_watches_before = self.events[drop][0]
            del self.events[:drop]
        self.cond.notify_all()

    def _stamp(self, obj: Obj) -> None:
        obj["metadata"]["resourceVersion"] = str(self.next_rv())

    @staticmethod
    def _kind(plural: str) -> Kind:
        if plural not in PLURALS:
            raise ApiError(404, "the server could not find the requested resource")
        return PLURALS[plural]

    def _check(self, kind: Kind, body: Obj) -> None:
        name = (body.get("metadata") or {}).get("name", "")
        rule = DNS_LABEL if kind.plural in LABEL_NAMED else DNS_SUBDOMAIN if kind.plural in SUBDOMAIN_NAMED else None
        if rule is not None and (len(name) > (63 if rule is DNS_LABEL else 253) or not rule.fullmatch(name)):
            raise ApiError(422, f'{kind.kind} "{name}" is invalid: metadata.name: Invalid value: "{name}": a '
                                f'lowercase RFC 1123 {"label" if rule is DNS_LABEL else "subdomain"} must consist '
                                "of lower case alphanumeric characters, '-' or '.'")
        if not self.validate or not kind.validate:
            return
        try:
            kubernetes_validate.validate(body, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            name = (body.get("metadata") or {}).get("name", "")
            raise ApiError(422, f'{kind.kind} "{name}" is invalid: {exc.message}') from None

    def take_fault(self, method: str, plural: str) -> Fault | None:
        with self.cond:
            self.requests.append((method, plural))
            for fault in self.faults:
                if fault.method == method and fault.plural == plural and fault.times > 0:
                    fault.times -= 1
                    return fault
        return None

    # -------------------------------------------------------------------------------------- verbs

    @staticmethod
    def _own_copy(kind: Kind, body: Obj) -> Obj:
        """The store's own copy of a request body, with its apiVersion and kind filled in."""
        if not isinstance(body, dict) or not isinstance(body.get("metadata"), dict):
            raise ApiError(400, "the body is not an object with metadata")
        body = copy.deepcopy(body)
        body.setdefault("apiVersion", kind.api_version)
        body.setdefault("kind", kind.kind)
        return body

    def create(self, plural: str, namespace: str, body: Obj) -> Obj:
        kind = self._kind(plural)
        body = self._own_copy(kind, body)
        meta = body["metadata"]
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        self._check(kind, body)
        ns = namespace if kind.namespaced else ""
        with self.cond:
            if kind.namespaced and self.require_namespaces:
                space = self.objects.get(("namespaces", "", ns))
                if space is None:
                    raise ApiError(404, f'namespaces "{ns}" not found')
                if space["metadata"].get("deletionTimestamp"):
                    raise ApiError(403, f'{plural} "{meta["name"]}" is forbidden: unable to create new content '
                                        f'in namespace {ns} because it is being terminated')
            key = (plural, ns, meta["name"])
            if key in self.objects:
                raise ApiError(409, f'{plural} "{meta["name"]}" already exists', "AlreadyExists")
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339())
            meta.pop("deletionTimestamp", None)
            if kind.namespaced:
                meta["namespace"] = ns
            if "spec" in body:
                meta["generation"] = 1
            self._defaults(plural, body)
            self._stamp(body)
            self.objects[key] = body
            self._record(plural, "ADDED", body)
            if plural == "namespaces":
                self._create_default_service_account(meta["name"])
            return copy.deepcopy(body)

    def _defaults(self, plural: str, body: Obj) -> None:
        """Defaults and allocations the server makes on create."""
        if plural in STATUS_SUBRESOURCE:
            body["status"] = {}
        if plural == "pods":
            spec = body["spec"]
            spec.setdefault("restartPolicy", "Always")
            spec.setdefault("terminationGracePeriodSeconds", 30)
            spec.setdefault("serviceAccountName", "default")
            body["status"] = {"phase": "Pending"}
            if self.auto_run:
                body["status"] = {"phase": "Running", "podIP": "10.244.0.7"}
        elif plural == "namespaces":
            body["status"] = {"phase": "Active"}
            body["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = body["metadata"]["name"]
        elif plural == "services":
            spec = body.setdefault("spec", {})
            spec.setdefault("type", "ClusterIP")
            if spec.get("clusterIP") != "None":
                spec["clusterIP"] = next(self._cluster_ips)
                spec["clusterIPs"] = [spec["clusterIP"]]
        elif plural == "persistentvolumeclaims":
            body["status"] = {"phase": "Bound"}

    def _create_default_service_account(self, namespace: str) -> None:
        sa = {"apiVersion": "v1", "kind": "ServiceAccount",
              "metadata": {"name": "default", "namespace": namespace, "uid": str(uuid.uuid4()),
                           "creationTimestamp": now_rfc3339()}}
        key = ("serviceaccounts", namespace, "default")
        if key not in self.objects:
            self._stamp(sa)
            self.objects[key] = sa
            self._record("serviceaccounts", "ADDED", sa)

    def get(self, plural: str, namespace: str, name: str) -> Obj:
        kind = self._kind(plural)
        with self.cond:
            obj = self.objects.get((plural, namespace if kind.namespaced else "", name))
            if obj is None:
                raise ApiError(404, f'{plural} "{name}" not found')
            return copy.deepcopy(obj)

    def find(self, plural: str, namespace: str, name: str) -> Obj | None:
        try:
            return self.get(plural, namespace, name)
        except ApiError:
            return None

    def list(self, plural: str, namespace: str | None, label_selector: str = "", field_selector: str = "",
             limit: int = 0, continue_token: str = "",  # nosec B107  # a list's paging cursor, not a secret
             ) -> tuple[list[Obj], str, str]:
        """Items (sorted by namespace and name), the list's resourceVersion and a continue token."""
        kind = self._kind(plural)
        try:
            wanted = selectors.parse(label_selector)
        except selectors.SelectorError as exc:
            raise ApiError(400, str(exc)) from None
        fields = self._field_predicate(field_selector)
        start, list_rv = ("", ""), None
        if continue_token:
            try:
                token = json.loads(base64.urlsafe_b64decode(continue_token.encode()))
                start, list_rv = (token["ns"], token["name"]), token["rv"]
            except (ValueError, KeyError, TypeError):
                raise ApiError(400, "continue token is not valid") from None
        with self.cond:
            if list_rv is not None and int(list_rv) < self.expire_watches_before:
                raise ApiError(410, "The provided continue parameter is too old", "Expired")
            rv = str(list_rv if list_rv is not None else self.resource_version)
            keys = sorted(k for k in self.objects if k[0] == plural
                          and (namespace is None or not kind.namespaced or k[1] == namespace))
            items = []
            for key in keys:
                if (key[1], key[2]) <= start and continue_token:
                    continue
                obj = self.objects[key]
                if wanted(obj["metadata"].get("labels") or {}) and fields(obj):
                    items.append(copy.deepcopy(obj))
        more = ""
        if limit and len(items) > limit:
            last = items[limit - 1]["metadata"]
            token = {"ns": last.get("namespace", ""), "name": last["name"], "rv": rv}
            more = base64.urlsafe_b64encode(json.dumps(token).encode()).decode()
            items = items[:limit]
        return items, rv, more

    @staticmethod
    def _field_predicate(selector: str) -> Callable[[Obj], bool]:
        terms = []
        for term in filter(None, (t.strip() for t in (selector or "").split(","))):
            if "=" not in term or not term.split("=", 1)[0].rstrip("!"):
                raise ApiError(400, f"invalid field selector: {term!r}: expected field=value or field!=value")
            negate = "!=" in term
            path, value = term.split("!=" if negate else "=", 1)
            value = value.lstrip("=")

            def pick(obj: Obj, path: str = path) -> str:
                node: Any = obj
                for part in path.split("."):
                    node = node.get(part) if isinstance(node, dict) else None
                return "" if node is None else str(node)

            terms.append(lambda obj, pick=pick, value=value, negate=negate: (pick(obj) == value) != negate)
        return lambda obj: all(t(obj) for t in terms)

    def replace(self, plural: str, namespace: str, name: str, body: Obj, subresource: str = "") -> Obj:
        kind = self._kind(plural)
        body = self._own_copy(kind, body)
        if body["metadata"].get("name", name) != name:
            raise ApiError(400, "the name of the object does not match the name on the URL")
        body["metadata"]["name"] = name
        if not subresource:
            self._check(kind, {k: v for k, v in body.items() if k != "status"})
        ns = namespace if kind.namespaced else ""
        with self.cond:
            current = self.objects.get((plural, ns, name))
            if current is None:
                raise ApiError(404, f'{plural} "{name}" not found')
            sent_rv = body["metadata"].get("resourceVersion")
            if sent_rv and sent_rv != current["metadata"]["resourceVersion"]:
                raise ApiError(409, f'Operation cannot be fulfilled on {plural} "{name}": the object has been '
                                    f"modified; please apply your changes to the latest version and try again")
            if subresource == "status":
                updated = copy.deepcopy(current)
                updated["status"] = body.get("status") or {}
            else:
                updated = body
                keep = {k: current["metadata"][k] for k in ("uid", "creationTimestamp", "deletionTimestamp",
                                                           "deletionGracePeriodSeconds", "generation")
                        if k in current["metadata"]}
                updated["metadata"].update(keep)
                if kind.namespaced:
                    updated["metadata"]["namespace"] = ns
                if plural in STATUS_SUBRESOURCE:
                    updated["status"] = copy.deepcopy(current.get("status", {}))
                if plural == "services":
                    spec = updated.setdefault("spec", {})
                    for immutable in ("clusterIP", "clusterIPs"):
                        if immutable in current.get("spec", {}):
                            spec[immutable] = current["spec"][immutable]
                if "spec" in updated and updated.get("spec") != current.get("spec"):
                    updated["metadata"]["generation"] = int(current["metadata"].get("generation", 1)) + 1
            self._stamp(updated)
            self.objects[(plural, ns, name)] = updated
            self._record(plural, "MODIFIED", updated)
            # As the real registry: an update that drops the last finalizer completes a deletion, unless a
            # grace period still runs (a terminating pod goes when its kubelet, or pod_termination_s, says).
            meta = updated["metadata"]
            if meta.get("deletionTimestamp") and not meta.get("finalizers") and \
                    not meta.get("deletionGracePeriodSeconds"):
                self._remove(plural, ns, name)
            return copy.deepcopy(updated)

    def patch(self, plural: str, namespace: str, name: str, patch: Obj, subresource: str = "") -> Obj:
        with self.cond:  # read and write as one step: a patch never conflicts with a write in between
            current = self.get(plural, namespace, name)
            merged = merge_patch(current, patch)
            # A patch that names a resourceVersion is a precondition (409 when stale), as on a real server.
            sent_rv = ((patch or {}).get("metadata") or {}).get("resourceVersion") if isinstance(patch, dict) else None
            merged["metadata"]["resourceVersion"] = sent_rv or current["metadata"]["resourceVersion"]
            return self.replace(plural, namespace, name, merged, subresource)

    def apply(self, plural: str, namespace: str, name: str, body: Obj, subresource: str = "") -> Obj:
        """Server-side apply as far as one field manager needs it: create, or merge into what is there."""
        if self.find(plural, namespace, name) is None and not subresource:
            return self.create(plural, namespace, {**body, "metadata": {**body.get("metadata", {}), "name": name}})
        return self.patch(plural, namespace, name, body, subresource)

    def delete(self, plural: str, namespace: str, name: str, *, grace_s: int | None = None,
               propagation: str = "Background") -> Obj:
        """Begin deleting; returns the object as it now is (with deletionTimestamp while it lingers)."""
        kind = self._kind(plural)
        ns = namespace if kind.namespaced else ""
        with self.cond:
            obj = self.objects.get((plural, ns, name))
            if obj is None:
                raise ApiError(404, f'{plural} "{name}" not found')
            meta = obj["metadata"]
            if propagation == "Orphan":
                self._orphan(meta["uid"])
            if plural == "pods":
                grace = int(obj["spec"].get("terminationGracePeriodSeconds", 30) if grace_s is None else grace_s)
                running = obj.get("status", {}).get("phase") in ("Running", "Pending") and \
                    (obj["spec"].get("nodeName") or self.pod_termination_s is not None)
                if grace > 0 and running:
                    if not meta.get("deletionTimestamp"):
                        meta["deletionTimestamp"] = now_rfc3339(grace)
                        meta["deletionGracePeriodSeconds"] = grace
                        self._stamp(obj)
                        self._record(plural, "MODIFIED", obj)
                    return copy.deepcopy(obj)
            if plural == "namespaces":
                if not meta.get("deletionTimestamp"):
                    meta["deletionTimestamp"] = now_rfc3339()
                    obj["status"] = {"phase": "Terminating"}
                    meta.setdefault("finalizers", []).append("kubernetes")
                    self._stamp(obj)
                    self._record(plural, "MODIFIED", obj)
                return copy.deepcopy(obj)
            if propagation == "Foreground" and self._dependents(meta["uid"]):
                meta.setdefault("finalizers", []).append("foregroundDeletion")
            if meta.get("finalizers"):
                if not meta.get("deletionTimestamp"):
                    meta["deletionTimestamp"] = now_rfc3339()
                    meta["deletionGracePeriodSeconds"] = 0
                    self._stamp(obj)
                    self._record(plural, "MODIFIED", obj)
                    if "foregroundDeletion" in meta["finalizers"]:
                        self._gc_queue.append((meta["uid"], "Foreground"))
                        self.cond.notify_all()
                return copy.deepcopy(obj)
            return self._remove(plural, ns, name)

    def finish_pod_deletion(self, namespace: str, name: str) -> None:
        """What the kubelet does once a terminating pod's containers are gone."""
        with self.cond:
            obj = self.objects.get(("pods", namespace, name))
            if obj is not None and obj["metadata"].get("deletionTimestamp") and not obj["metadata"].get("finalizers"):
                self._remove("pods", namespace, name)

    def _remove(self, plural: str, ns: str, name: str) -> Obj:
        obj = self.objects.pop((plural, ns, name))
        self._stamp(obj)
        self._record(plural, "DELETED", obj)
        self._gc_queue.append((obj["metadata"]["uid"], "Background"))
        self.cond.notify_all()
        return copy.deepcopy(obj)

    def _dependents(self, owner_uid: str) -> list[Key]:
        return [key for key, obj in self.objects.items()
                if any(ref.get("uid") == owner_uid for ref in obj["metadata"].get("ownerReferences") or [])]

    def _orphan(self, owner_uid: str) -> None:
        for key in self._dependents(owner_uid):
            obj = self.objects[key]
            obj["metadata"]["ownerReferences"] = [r for r in obj["metadata"]["ownerReferences"]
                                                  if r.get("uid") != owner_uid]
            self._stamp(obj)
            self._record(key[0], "MODIFIED", obj)

    # --------------------------------------------------------------------------- background work

    def _background(self) -> None:
        """The garbage collector, the namespace controller and the no-kubelet pod terminator."""
        while True:
            with self.cond:
                if self.closing:
                    return
                self.cond.wait(0.05)
                if self.closing:
                    return
                self._collect()
                self._finish_namespaces()
                self._finish_foreground()
                if self.pod_termination_s is not None:
                    self._finish_pods()

    def _collect(self) -> None:
        queue, self._gc_queue = self._gc_queue, []
        for owner_uid, _propagation in queue:
            if any(o["metadata"]["uid"] == owner_uid and not o["metadata"].get("deletionTimestamp")
                   for o in self.objects.values()):
                continue  # the owner is back (same uid cannot return, but be safe)
            for plural, ns, name in self._dependents(owner_uid):
                obj = self.objects.get((plural, ns, name))
                if obj is None or obj["metadata"].get("deletionTimestamp"):
                    continue
                self._delete_locked(plural, ns, name)

    def _delete_locked(self, plural: str, ns: str, name: str) -> None:
        # delete() takes the (reentrant) condition's lock again; Condition wraps an RLock.
        with contextlib.suppress(ApiError):
            self.delete(plural, ns, name)

    def _finish_foreground(self) -> None:
        for (plural, ns, name), obj in list(self.objects.items()):
            meta = obj["metadata"]
            if "foregroundDeletion" in (meta.get("finalizers") or []) and not self._dependents(meta["uid"]):
                meta["finalizers"] = [f for f in meta["finalizers"] if f != "foregroundDeletion"]
                if not meta["finalizers"]:
                    self._remove(plural, ns, name)
            elif "foregroundDeletion" in (meta.get("finalizers") or []):
                for dep in self._dependents(meta["uid"]):
                    if not self.objects[dep]["metadata"].get("deletionTimestamp"):
                        self._delete_locked(*dep)

    def _finish_namespaces(self) -> None:
        for (_plural, _ns, name), obj in list(self.objects.items()):
            if _plural != "namespaces" or not obj["metadata"].get("deletionTimestamp"):
                continue
            content = [k for k in self.objects if k[1] == name and k[0] != "namespaces"]
            for key in content:
                if not self.objects[key]["metadata"].get("deletionTimestamp"):
                    self._delete_locked(*key)
            if not content:
                obj["metadata"]["finalizers"] = [f for f in obj["metadata"].get("finalizers", []) if f != "kubernetes"]
                if not obj["metadata"]["finalizers"]:
                    self._remove("namespaces", "", name)

    def _finish_pods(self) -> None:
        cutoff = time.time() - (self.pod_termination_s or 0)
        for (plural, ns, name), obj in list(self.objects.items()):
            if plural != "pods" or not obj["metadata"].get("deletionTimestamp"):
                continue
            started = self._terminating.setdefault((plural, ns, name), time.time())
            if started <= cutoff and not obj["metadata"].get("finalizers"):
                self._terminating.pop((plural, ns, name), None)
                self._remove(plural, ns, name)

    # ------------------------------------------------------------------------------------ watches

    def watch(self, plural: str, namespace: str | None, label_selector: str, since: int, timeout_s: float,
              bookmarks: bool = False, bookmark_every_s: float = 5.0, initial_events: bool = False
              ) -> Iterator[Obj]:
        """Events after `since` until the timeout; an ERROR 410 event when `since` is compacted away.

        With `initial_events` (a watch-list request, sendInitialEvents=true), every current object comes
        first as ADDED, then a BOOKMARK annotated ``k8s.io/initial-events-end``, as client-go expects.
        A bad kind or selector raises ApiError here, before any event, so the HTTP layer answers 400."""
        kind = self._kind(plural)
        try:
            wanted = selectors.parse(label_selector)
        except selectors.SelectorError as exc:
            raise ApiError(400, str(exc)) from None
        return self._events(kind, plural, namespace, label_selector, wanted, since, timeout_s, bookmarks,
                            bookmark_every_s, initial_events)

    def _events(self, kind: Kind, plural: str, namespace: str | None, label_selector: str,
                wanted: selectors.Requirement, since: int, timeout_s: float, bookmarks: bool,
                bookmark_every_s: float, initial_events: bool) -> Iterator[Obj]:
        deadline = time.monotonic() + timeout_s
        next_bookmark = time.monotonic() + bookmark_every_s
        if not since and not initial_events:
            # A watch from no resourceVersion ("0" or unset) starts with the current objects as ADDED.
            items, rv, _ = self.list(plural, namespace, label_selector)
            for item in items:
                yield {"type": "ADDED", "object": item}
            since = int(rv)
        if initial_events:
            items, rv, _ = self.list(plural, namespace, label_selector)
            for item in items:
                yield {"type": "ADDED", "object": item}
            yield {"type": "BOOKMARK", "object": {
                "kind": kind.kind, "apiVersion": kind.api_version,
                "metadata": {"resourceVersion": rv, "annotations": {"k8s.io/initial-events-end": "true"}}}}
            since = int(rv)
        with self.cond:
            if since and since < self.expire_watches_before:
                yield {"type": "ERROR", "object": status_body(410, "Expired",
                                                              f"too old resource version: {since}")}
                return
            if not since:
                since = self.resource_version
        while time.monotonic() < deadline:
            with self.cond:
                if self.closing:
                    return
                pending = [(rv, t, o) for rv, p, t, o in self.events
                           if p == plural and rv > since
                           and (namespace is None or not kind.namespaced or o["metadata"].get("namespace") == namespace)
                           and wanted(o["metadata"].get("labels") or {})]
                if not pending:
                    self.cond.wait(0.05)
                current = self.resource_version
            for rv, event_type, obj in pending:
                yield {"type": event_type, "object": obj}
                since = rv
            if bookmarks and time.monotonic() >= next_bookmark:
                next_bookmark = time.monotonic() + bookmark_every_s
                since = max(since, current)
                yield {"type": "BOOKMARK", "object": {"kind": kind.kind, "apiVersion": kind.api_version,
                                                      "metadata": {"resourceVersion": str(since)}}}

    def wait_for_change(self, seen: int, timeout_s: float) -> int:
        """Block until the store's resourceVersion passes `seen` (controllers' wake-up)."""
        with self.cond:
            if self.resource_version <= seen:
                self.cond.wait(timeout_s)
            return self.resource_version

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self._thread.join(2)

