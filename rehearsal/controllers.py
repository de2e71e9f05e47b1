"""The controllers a cluster runs for the chart's workloads: Deployments, StatefulSets, Jobs, DaemonSets.

Each is level-triggered: on every change in the store it compares what exists with what is declared and
takes one step. They follow the real controllers where a user or helm would notice: pods are refused when
their ServiceAccount does not exist (the admission error is kept in the owner's conditions), Deployments
roll with maxSurge/maxUnavailable and report the status fields kstatus (``helm --wait``) reads,
StatefulSets create ordinal pods one by one with their PVCs, Jobs retry up to backoffLimit, honour
activeDeadlineSeconds and ttlSecondsAfterFinished. ReplicaSets are skipped: Deployment pods are owned by
the Deployment directly and carry the template hash label.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from rehearsal.store import ApiError, Obj, Store, now_rfc3339

log = logging.getLogger("rehearsal.controllers")
HASH_LABEL = "pod-template-hash"


def template_hash(template: Obj) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


def is_ready(pod: Obj) -> bool:
    if pod["metadata"].get("deletionTimestamp"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def owned_by(obj: Obj, owner: Obj) -> bool:
    return any(ref.get("uid") == owner["metadata"]["uid"] for ref in obj["metadata"].get("ownerReferences") or [])


def _intstr(value: Any, total: int, round_up: bool) -> int:
    if isinstance(value, str) and value.endswith("%"):
        share = total * int(value[:-1]) / 100
        return math.ceil(share) if round_up else math.floor(share)
    return int(value)


def _age_s(timestamp: str | None) -> float:
    if not timestamp:
        return 0.0
    then = datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return (datetime.now(UTC) - then).total_seconds()


class Controllers:
    """Runs every controller in one thread until stopped."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rehearsal-controllers", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        seen = 0
        while not self._stop.is_set():
            seen = self.store.wait_for_change(seen, 0.5)
            try:
                self.reconcile()
            except Exception:  # a controller bug must not stop the others; it is logged and retried
                log.exception("controller step failed")

    def reconcile(self) -> None:
        for deploy in self._all("deployments"):
            self._deployment(deploy)
        for sts in self._all("statefulsets"):
            self._statefulset(sts)
        for job in self._all("jobs"):
            self._job(job)
        for ds in self._all("daemonsets"):
            self._daemonset(ds)

    # ------------------------------------------------------------------------------------- helpers

    def _all(self, plural: str) -> list[Obj]:
        items, _, _ = self.store.list(plural, None)
        return [o for o in items if not o["metadata"].get("deletionTimestamp")]

    def _pods_of(self, owner: Obj) -> list[Obj]:
        items, _, _ = self.store.list("pods", owner["metadata"]["namespace"])
        return [p for p in items if owned_by(p, owner)]

    def _admission_error(self, namespace: str, pod_spec: Obj, pod_name: str) -> str | None:
        """What the API server's admission would refuse a new pod for (a missing ServiceAccount)."""
        account = pod_spec.get("serviceAccountName") or "default"
        if self.store.find("serviceaccounts", namespace, account) is None:
            return (f'pods "{pod_name}" is forbidden: error looking up service account '
                    f'{namespace}/{account}: serviceaccount "{account}" not found')
        return None

    def _make_pod(self, owner: Obj, template: Obj, name: str, extra_labels: dict[str, str]) -> str | None:
        """Create a pod from a template; the admission error when it is refused."""
        ns = owner["metadata"]["namespace"]
        spec = copy.deepcopy(template.get("spec") or {})
        refused = self._admission_error(ns, spec, name)
        if refused:
            return refused
        meta = copy.deepcopy(template.get("metadata") or {})
        meta["name"] = name
        meta["labels"] = {**(meta.get("labels") or {}), **extra_labels}
        meta["ownerReferences"] = [{"apiVersion": owner["apiVersion"], "kind": owner["kind"],
                                    "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"],
                                    "controller": True, "blockOwnerDeletion": True}]
        try:
            self.store.create("pods", ns, {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec})
        except ApiError as exc:
            return exc.message
        return None

    def _set_status(self, obj: Obj, plural: str, status: Obj) -> None:
        if obj.get("status") == status:
            return
        # A conflict means it changed meanwhile: the next pass sees the new version.
        with contextlib.suppress(ApiError):
            self.store.replace(plural, obj["metadata"]["namespace"], obj["metadata"]["name"],
                               {**obj, "status": status}, "status")

    @staticmethod
    def _condition(kind: str, status: bool, reason: str, message: str = "") -> Obj:
        return {"type": kind, "status": "True" if status else "False", "reason": reason, "message": message,
                "lastTransitionTime": now_rfc3339(), "lastUpdateTime": now_rfc3339()}

    def _delete_pod(self, pod: Obj) -> None:
        with contextlib.suppress(ApiError):
            self.store.delete("pods", pod["metadata"]["namespace"], pod["metadata"]["name"])

    # --------------------------------------------------------------------------------- Deployment

    def _deployment(self, deploy: Obj) -> None:
        spec = deploy["spec"]
        want = int(spec.get("replicas", 1))
        digest = template_hash(spec["template"])
        strategy = spec.get("strategy") or {}
        rolling = strategy.get("rollingUpdate") or {}
        surge = _intstr(rolling.get("maxSurge", "25%"), want, round_up=True)
        unavailable = _intstr(rolling.get("maxUnavailable", "25%"), want, round_up=False)
        if surge == 0 and unavailable == 0:
            unavailable = 1
        pods = [p for p in self._pods_of(deploy) if not p["metadata"].get("deletionTimestamp")]
        new = [p for p in pods if p["metadata"].get("labels", {}).get(HASH_LABEL) == digest]
        old = [p for p in pods if p not in new]
        ready = [p for p in pods if is_ready(p)]
        refused = None
        if strategy.get("type") == "Recreate" and old:
            for pod in old:
                self._delete_pod(pod)
        elif len(new) < want and len(pods) < want + surge:
            name = f"{deploy['metadata']['name']}-{digest[:8]}-{uuid.uuid4().hex[:5]}"
            refused = self._make_pod(deploy, spec["template"], name, {HASH_LABEL: digest})
        if old:
            # Take down old pods while enough stay available: unready ones first.
            removable = sorted(old, key=is_ready)
            for pod in removable:
                if not is_ready(pod) or len(ready) - 1 >= want - unavailable:
                    self._delete_pod(pod)
                    if is_ready(pod):
                        ready.remove(pod)
                    break
        elif len(new) > want:
            self._delete_pod(sorted(new, key=is_ready)[0])
        new_ready = [p for p in new if is_ready(p)]
        complete = not old and len(new) == want and len(new_ready) == want
        conditions = [self._condition("Available", len(ready) >= want - unavailable,
                                      "MinimumReplicasAvailable" if len(ready) >= want - unavailable
                                      else "MinimumReplicasUnavailable")]
        conditions.append(self._condition("Progressing", True, "NewReplicaSetAvailable" if complete
                                          else "ReplicaSetUpdated"))
        if refused:
            conditions.append(self._condition("ReplicaFailure", True, "FailedCreate", refused))
        status = {"observedGeneration": deploy["metadata"].get("generation", 1), "replicas": len(pods),
                  "updatedReplicas": len(new), "readyReplicas": len(ready), "availableReplicas": len(ready),
                  "unavailableReplicas": max(0, want - len(ready)), "conditions": conditions}
        self._set_status(deploy, "deployments", _stable(deploy.get("status"), status))

    # -------------------------------------------------------------------------------- StatefulSet

    def _statefulset(self, sts: Obj) -> None:
        spec = sts["spec"]
        name = sts["metadata"]["name"]
        ns = sts["metadata"]["namespace"]
        want = int(spec.get("replicas", 1))
        revision = f"{name}-{template_hash(spec['template'])}"
        pods = {p["metadata"]["name"]: p for p in self._pods_of(sts)}
        refused = None
        for ordinal in range(want):
            pod_name = f"{name}-{ordinal}"
            pod = pods.get(pod_name)
            if pod is None:
                template = copy.deepcopy(spec["template"])
                volumes = template["spec"].setdefault("volumes", [])
                for claim in spec.get("volumeClaimTemplates") or []:
                    claim_name = f"{claim['metadata']['name']}-{pod_name}"
                    if self.store.find("persistentvolumeclaims", ns, claim_name) is None:
                        self.store.create("persistentvolumeclaims", ns, {
                            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                            "metadata": {"name": claim_name, "labels": spec["selector"].get("matchLabels", {})},
                            "spec": claim["spec"]})
                    volumes.append({"name": claim["metadata"]["name"],
                                    "persistentVolumeClaim": {"claimName": claim_name}})
                refused = self._make_pod(sts, template, pod_name, {
                    "controller-revision-hash": revision, "statefulset.kubernetes.io/pod-name": pod_name})
                break  # OrderedReady: one at a time
            if pod["metadata"].get("deletionTimestamp"):
                break
            if pod["metadata"]["labels"].get("controller-revision-hash") != revision and \
                    all(is_ready(p) for p in pods.values()):
                self._delete_pod(pod)  # rolling update, replaced on the next pass
                break
            if not is_ready(pod):
                break
        live = [p for p in pods.values() if not p["metadata"].get("deletionTimestamp")]
        ready = [p for p in live if is_ready(p)]
        updated = [p for p in live if p["metadata"]["labels"].get("controller-revision-hash") == revision]
        status: Obj = {"observedGeneration": sts["metadata"].get("generation", 1), "replicas": len(live),
                       "readyReplicas": len(ready), "availableReplicas": len(ready),
                       "currentReplicas": len(updated), "updatedReplicas": len(updated),
                       "currentRevision": revision, "updateRevision": revision}
        if refused:
            status["conditions"] = [self._condition("ReplicaFailure", True, "FailedCreate", refused)]
        self._set_status(sts, "statefulsets", _stable(sts.get("status"), status))

    # --------------------------------------------------------------------------------------- Job

    def _job(self, job: Obj) -> None:
        spec = job["spec"]
        status = copy.deepcopy(job.get("status") or {})
        conditions = status.get("conditions") or []
        finished = next((c for c in conditions if c["type"] in ("Complete", "Failed") and c["status"] == "True"),
                        None)
        if finished:
            ttl = spec.get("ttlSecondsAfterFinished")
            if ttl is not None and _age_s(status.get("completionTime")) >= int(ttl):
                with contextlib.suppress(ApiError):
                    self.store.delete("jobs", job["metadata"]["namespace"], job["metadata"]["name"],
                                      propagation="Background")
            return
        pods = self._pods_of(job)
        succeeded = sum(1 for p in pods if p.get("status", {}).get("phase") == "Succeeded")
        failed_pods = sum(1 for p in pods if p.get("status", {}).get("phase") == "Failed")
        restarts = sum(int(c.get("restartCount", 0)) for p in pods
                       for c in p.get("status", {}).get("containerStatuses") or [])
        failures = failed_pods + restarts
        active = [p for p in pods if p.get("status", {}).get("phase") in ("Pending", "Running")
                  and not p["metadata"].get("deletionTimestamp")]
        status.setdefault("startTime", now_rfc3339())
        deadline = spec.get("activeDeadlineSeconds")
        now = now_rfc3339()
        if succeeded >= int(spec.get("completions", 1)):
            status.update(succeeded=succeeded, active=0, completionTime=now, conditions=[
                self._condition("SuccessCriteriaMet", True, "CompletionsReached"),
                self._condition("Complete", True, "CompletionsReached")])
        elif failures > int(spec.get("backoffLimit", 6)) or \
                (deadline is not None and _age_s(status["startTime"]) > int(deadline)):
            reason = "BackoffLimitExceeded" if failures > int(spec.get("backoffLimit", 6)) else "DeadlineExceeded"
            for pod in active:
                self._delete_pod(pod)
            status.update(failed=failures, active=0, completionTime=now, conditions=[
                self._condition("FailureTarget", True, reason), self._condition("Failed", True, reason)])
        elif not active:
            name = f"{job['metadata']['name']}-{uuid.uuid4().hex[:5]}"
            refused = self._make_pod(job, spec["template"], name, {
                "job-name": job["metadata"]["name"], "batch.kubernetes.io/job-name": job["metadata"]["name"],
                "controller-uid": job["metadata"]["uid"]})
            status["active"] = 0 if refused else 1
            if refused:
                status["conditions"] = [self._condition("PodCreateFailed", True, "FailedCreate", refused)]
        else:
            status.update(active=len(active), failed=failures, succeeded=succeeded)
        self._set_status(job, "jobs", _stable(job.get("status"), status))

    # --------------------------------------------------------------------------------- DaemonSet

    def _daemonset(self, ds: Obj) -> None:
        """One node: one pod."""
        digest = template_hash(ds["spec"]["template"])
        pods = [p for p in self._pods_of(ds) if not p["metadata"].get("deletionTimestamp")]
        for pod in pods:
            if pod["metadata"]["labels"].get(HASH_LABEL) != digest:
                self._delete_pod(pod)
        if not any(p["metadata"]["labels"].get(HASH_LABEL) == digest for p in pods):
            self._make_pod(ds, ds["spec"]["template"], f"{ds['metadata']['name']}-{uuid.uuid4().hex[:5]}",
                           {HASH_LABEL: digest})
        ready = sum(1 for p in pods if is_ready(p))
        status = {"observedGeneration": ds["metadata"].get("generation", 1), "desiredNumberScheduled": 1,
                  "currentNumberScheduled": len(pods), "numberReady": ready, "updatedNumberScheduled": len(pods),
                  "numberAvailable": ready, "numberMisscheduled": 0}
        self._set_status(ds, "daemonsets", status)


def _stable(old: Obj | None, new: Obj) -> Obj:
    """Keep the old conditions' timestamps when nothing else about them changed (no write storms)."""
    if not old:
        return new
    before = {c["type"]: c for c in old.get("conditions") or []}
    for cond in new.get("conditions") or []:
        prior = before.get(cond["type"])
        if prior and (prior["status"], prior.get("reason"), prior.get("message")) == \
                (cond["status"], cond.get("reason"), cond.get("message")):
            cond["lastTransitionTime"] = prior.get("lastTransitionTime", cond["lastTransitionTime"])
            cond["lastUpdateTime"] = prior.get("lastUpdateTime", cond["lastUpdateTime"])
    for key in ("startTime", "completionTime"):
        if key in old and key in new and new.get("conditions") == old.get("conditions"):
            new[key] = old[key]
    return new


_ = time  # time is used by callers that import this module's helpers
