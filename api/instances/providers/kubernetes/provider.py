"""KubernetesProvider: one session = root ConfigMap + Secret + PVC + NetworkPolicy + Pod.

Runs the official (sync) ``kubernetes`` client in worker threads via ``asyncio.to_thread``. Objects
come from the pure builders in ``manifests``; status comes from ``PodCache`` (a watch), never from a
request per poll. Everything needed to find a session's objects again is returned as provider state
and persisted by the API, so a restarted API or one with different templates orphans nothing.

- create: root ConfigMap first (its uid becomes every other object's owner), then Secret, PVC,
  NetworkPolicy, Pod. Each step treats 409 AlreadyExists as done, so a retried create converges.
- start: refresh the Secret (a new runner token), make sure PVC and policy exist, create the Pod.
- stop: delete the Pod only; the PVC (workspace) and Secret stay.
- delete: delete every object by name (404 is fine); the root's garbage collection backs this up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from kubernetes import client as k8s
from kubernetes import config as k8s_config

from api.cloud_yaml import DEFAULT_MAX_SERVICES
from api.instances.providers.base import (
    ComputeSpec,
    ComputeStatus,
    Provider,
    ProviderFailure,
    ProviderState,
    without_operator_records,
)
from api.instances.providers.kubernetes import errors, manifests, names
from api.instances.providers.kubernetes.cache import PodCache, RootCache
from api.instances.providers.kubernetes.status import compute_status, pod_ip
from api.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
Body = dict[str, Any]


def default_api_client() -> k8s.ApiClient:
    """In-cluster credentials when running in a pod, else the local kubeconfig."""
    configuration = k8s.Configuration()
    try:
        k8s_config.load_incluster_config(client_configuration=configuration)
    except k8s_config.ConfigException:
        k8s_config.load_kube_config(client_configuration=configuration)
    return k8s.ApiClient(configuration)


class KubernetesProvider(Provider):
    name = "kubernetes"
    runs_services = True
    # A deleted Pod's runner lives on until its termination grace period ends.
    runner_stop_grace_s = float(manifests.RUNNER_TERMINATION_GRACE_S)

    def __init__(self, settings: Settings, api_client: k8s.ApiClient | None = None, *,
                 request_timeout_s: float = 30.0, watch_timeout_s: int = 240, sync_timeout_s: float = 10.0,
                 terminate_wait_s: float = 60.0) -> None:
        self.config = manifests.ClusterConfig.from_settings(settings)
        self._owns_client = api_client is None
        self._api = api_client or default_api_client()
        self._core = k8s.CoreV1Api(self._api)
        self._net = k8s.NetworkingV1Api(self._api)
        self._timeout = request_timeout_s
        self._sync_timeout = sync_timeout_s
        self._terminate_wait = terminate_wait_s
        self.cache = PodCache(self._core, self.config.namespace, names.managed_selector(),
                              watch_timeout_s=watch_timeout_s, request_timeout_s=request_timeout_s)
        # The roots are only needed to list every session (the scheduler's reconciler): started by list().
        self.roots = RootCache(self._core, self.config.namespace, names.managed_selector(),
                               watch_timeout_s=watch_timeout_s, request_timeout_s=request_timeout_s)

    # ------------------------------------------------------------------------------------- plumbing

    @property
    def ns(self) -> str:
        return self.config.namespace

    async def _call(self, action: str, fn: Callable[..., T], *args: Any, secrets: Iterable[str] = (),
                    ok: tuple[int, ...] = (), **kwargs: Any) -> T | None:
        """Run one client call in a thread; statuses in ``ok`` return None, other errors fail typed."""
        kwargs.setdefault("_request_timeout", self._timeout)
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except Exception as exc:
            if ok and errors.is_status(exc, *ok):
                return None
            failure = errors.failure(exc, action, self.ns, secrets)
            log.warning("kubernetes: %s", failure.reason)
            raise failure from None

    async def _ensure(self, action: str, create: Callable[..., Any], replace: Callable[..., Any] | None,
                      name: str, body: Body, secrets: Iterable[str] = ()) -> None:
        """Create; on AlreadyExists replace (when given) so a changed template or token lands."""
        created = await self._call(action, create, self.ns, body, secrets=secrets, ok=(409,))
        if created is None and replace is not None:
            await self._call(action, replace, name, self.ns, body, secrets=secrets)

    async def _ensure_root(self, spec: ComputeSpec) -> str:
        """Create the root ConfigMap (or find it) and return its uid, the owner of everything else."""
        root = manifests.root_config_map(spec, self.config)
        made = await self._call("create the session's root ConfigMap",
                                self._core.create_namespaced_config_map, self.ns, root, ok=(409,),
                                _preload_content=False)
        if made is None:
            made = await self._call("read the session's root ConfigMap",
                                    self._core.read_namespaced_config_map, root["metadata"]["name"], self.ns,
                                    _preload_content=False)
        body = _json(made)
        self.roots.upsert(body)
        return str(body["metadata"]["uid"])

    def _state(self, spec: ComputeSpec, generation: int, *, stopped: bool = False) -> ProviderState:
        sid = spec.session_id
        return {
            "namespace": self.ns,
            "root": names.root_name(sid),
            "pod": names.pod_name(sid),
            "pvc": names.pvc_name(sid),
            "secret": names.secret_name(sid),
            "networkpolicy": names.network_policy_name(sid),
            "generation": generation,
            "stopped": stopped,
        }

    async def _create_pod(self, pod: Body, secrets: Iterable[str]) -> None:
        """Create the Pod; when the previous one is still terminating, wait for it to go first."""
        name = pod["metadata"]["name"]
        deadline = time.monotonic() + self._terminate_wait
        while True:
            made = await self._call("create the session's pod", self._core.create_namespaced_pod, self.ns,
                                    pod, secrets=secrets, ok=(409,), _preload_content=False)
            if made is not None:
                self.cache.upsert(_json(made))
                return
            existing = await self._call("read the session's pod", self._core.read_namespaced_pod, name,
                                        self.ns, ok=(404,), _preload_content=False)
            if existing is None:
                continue  # it went away between our create and read
            current = _json(existing)
            if not current.get("metadata", {}).get("deletionTimestamp"):
                self.cache.upsert(current)
                return  # already running for this session: starting twice is not an error
            if time.monotonic() > deadline:
                raise ProviderFailure("could not start: the previous pod is still shutting down")
            await asyncio.sleep(0.5)

    def _start_cache(self) -> None:
        self.cache.start()

    # ------------------------------------------------------------------------------------ interface

    async def create(self, spec: ComputeSpec) -> ProviderState:
        return await self._apply(spec, generation=1)

    async def start(self, spec: ComputeSpec, state: ProviderState) -> ProviderState:
        return await self._apply(spec, generation=int(state.get("generation", 0)) + 1)

    async def _apply(self, spec: ComputeSpec, generation: int) -> ProviderState:
        try:
            # Build everything first so a bad spec fails before any object exists.
            manifests.build(spec, self.config, generation=generation, owner_uid="pending")
        except manifests.ManifestError as exc:
            raise ProviderFailure(str(exc)) from None
        self._start_cache()
        secrets = [spec.runner_token, *spec.secret_env.values()]
        uid = await self._ensure_root(spec)
        objects = manifests.build(spec, self.config, generation=generation, owner_uid=uid)
        await self._ensure("store the session's secrets", self._core.create_namespaced_secret,
                           self._core.replace_namespaced_secret, objects.secret["metadata"]["name"],
                           objects.secret, secrets)
        # The PVC's spec is immutable once bound: never replace it, an existing one is the workspace.
        await self._ensure("create the session's workspace volume",
                           self._core.create_namespaced_persistent_volume_claim, None,
                           objects.pvc["metadata"]["name"], objects.pvc)
        await self._ensure("create the session's network policy",
                           self._net.create_namespaced_network_policy,
                           self._net.replace_namespaced_network_policy,
                           objects.network_policy["metadata"]["name"], objects.network_policy)
        await self._create_pod(objects.pod, secrets)
        log.info("kubernetes: session %s pod %s generation %s submitted", spec.session_id,
                 objects.pod["metadata"]["name"], generation)
        return self._state(spec, generation)

    def check_services(self, services: Sequence[Mapping[str, Any]], secret_keys: Collection[str],
                       max_services: int = DEFAULT_MAX_SERVICES) -> None:
        try:
            # The session id only names the Secret the references point at; it changes nothing checked.
            manifests.sidecar_containers(services, "check", secret_keys, max_services,
                                         self.config.service_image_registries)
        except manifests.ManifestError as exc:
            raise ProviderFailure(str(exc)) from None

    async def stop(self, session_id: str, state: ProviderState) -> ProviderState:
        pod = str(state.get("pod") or names.pod_name(session_id))
        await self._call("stop the session's pod", self._core.delete_namespaced_pod, pod,
                         str(state.get("namespace") or self.ns), ok=(404,), _preload_content=False)
        self.cache.discard(pod)
        return {**state, "pod": pod, "stopped": True}

    async def delete(self, session_id: str, state: ProviderState) -> None:
        ns = str(state.get("namespace") or self.ns)
        steps: list[tuple[str, Callable[..., Any], str]] = [
            ("delete the session's pod", self._core.delete_namespaced_pod,
             str(state.get("pod") or names.pod_name(session_id))),
            ("delete the session's network policy", self._net.delete_namespaced_network_policy,
             str(state.get("networkpolicy") or names.network_policy_name(session_id))),
            ("delete the session's secrets", self._core.delete_namespaced_secret,
             str(state.get("secret") or names.secret_name(session_id))),
            ("delete the session's workspace", self._core.delete_namespaced_persistent_volume_claim,
             str(state.get("pvc") or names.pvc_name(session_id))),
            # Last: should a step above fail, the root (and its garbage collection) still exists.
            ("delete the session's root ConfigMap", self._core.delete_namespaced_config_map,
             str(state.get("root") or names.root_name(session_id))),
        ]
        for action, fn, name in steps:
            await self._call(action, fn, name, ns, ok=(404,), propagation_policy="Background",
                             _preload_content=False)
        self.cache.discard(str(state.get("pod") or names.pod_name(session_id)))
        self.roots.discard(str(state.get("root") or names.root_name(session_id)))

    async def _synced(self) -> bool:
        self._start_cache()
        if self.cache.synced:
            return True
        return await asyncio.to_thread(self.cache.wait_synced, self._sync_timeout)

    async def status(self, session_id: str, state: ProviderState) -> ComputeStatus:
        if not await self._synced():
            raise ProviderFailure(self.cache.last_error or "could not watch session pods: no answer yet")
        pod = self.cache.get(str(state.get("pod") or names.pod_name(session_id)))
        return compute_status(pod, stopped=bool(state.get("stopped")))

    async def runner_endpoint_ok(self, session_id: str, state: ProviderState, host: str, port: int) -> bool:
        """Only the session's own Pod IP and the runner's port (the watch's Pod, else the API server's, which
        the first heartbeat may reach before the watch)."""
        if port != manifests.RUNNER_SSH_PORT:
            return False
        name = str(state.get("pod") or names.pod_name(session_id))
        if pod_ip(self.cache.get(name)) == host:
            return True
        pod = await self._call("read the session's pod", self._core.read_namespaced_pod, name, self.ns,
                               ok=(404,), _preload_content=False)
        return pod is not None and pod_ip(_json(pod)) == host

    async def list(self) -> dict[str, ComputeStatus]:
        """Sessions with a root ConfigMap (workspace kept) or a pod, by session id, from the watch caches."""
        self.roots.start()
        if not await self._synced() or not (self.roots.synced or
                                            await asyncio.to_thread(self.roots.wait_synced, self._sync_timeout)):
            raise ProviderFailure(self.cache.last_error or self.roots.last_error or
                                  "could not watch the sessions: no answer yet")
        pods = {p["metadata"].get("labels", {}).get(names.SESSION_LABEL): p for p in self.cache.items()}
        result: dict[str, ComputeStatus] = {}
        for item in self.roots.items():
            sid = (item.get("data") or {}).get("session") or item["metadata"]["labels"][names.SESSION_LABEL]
            result[sid] = compute_status(pods.pop(names.label_value(sid), None), stopped=True)
        # Pods without a root: orphans for the reconciler to see.
        for sid, pod in pods.items():
            if sid:
                result[sid] = compute_status(pod, stopped=False)
        return result

    async def read_log(self, session_id: str, state: ProviderState, limit: int = 65536) -> str:
        text = await self._call("read the runner's log", self._core.read_namespaced_pod_log,
                                str(state.get("pod") or names.pod_name(session_id)), self.ns,
                                container=names.RUNNER_CONTAINER, limit_bytes=limit, ok=(400, 404))
        return without_operator_records(text or "")[-limit:]

    async def close(self) -> None:
        await asyncio.to_thread(self.cache.close)
        await asyncio.to_thread(self.roots.close)
        if self._owns_client:
            self._api.close()


def _json(response: Any) -> Body:
    return json.loads(response.data) if response is not None else {}
