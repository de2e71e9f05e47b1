"""RBAC for the rehearsal's API server: a request is allowed when a Role or ClusterRole bound to its
service account grants the verb on the resource, as the real authorizer decides.

Tokens come from the kubelet (one per Pod that automounts its service account). The rehearsal's own
clients (helm, the steps) use the admin token. A refusal is the 403 a real server gives, with its wording.
"""

from __future__ import annotations

from rehearsal.kubelet import ServiceAccountTokens
from rehearsal.store import ApiError, Obj, Store


def _grants(rule: Obj, verb: str, group: str, resource: str, name: str) -> bool:
    groups, resources = rule.get("apiGroups") or [], rule.get("resources") or []
    verbs, names = rule.get("verbs") or [], rule.get("resourceNames") or []
    return (("*" in groups or group in groups) and ("*" in resources or resource in resources)
            and ("*" in verbs or verb in verbs) and (not names or name in names))


class Authorizer:
    def __init__(self, store: Store, tokens: ServiceAccountTokens, admin_token: str) -> None:
        self.store = store
        self.tokens = tokens
        self.admin_token = admin_token
        self.denials: list[str] = []

    def __call__(self, verb: str, group: str, plural: str, sub: str, namespace: str, name: str, token: str) -> None:
        if token == self.admin_token:
            return
        identity = self.tokens.by_token.get(token)
        if identity is None:
            raise ApiError(401, "Unauthorized", "Unauthorized")
        sa_ns, sa_name = identity
        resource = f"{plural}/{sub}" if sub else plural
        if self._allowed(sa_ns, sa_name, verb, group, resource, namespace, name):
            return
        user = f"system:serviceaccount:{sa_ns}:{sa_name}"
        scope = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
        message = (f'{resource} "{name}" is forbidden: ' if name else f"{resource} is forbidden: ") + \
            f'User "{user}" cannot {verb} resource "{plural}" in API group "{group}"{scope}'
        self.denials.append(message)
        raise ApiError(403, message)

    def _allowed(self, sa_ns: str, sa_name: str, verb: str, group: str, resource: str, namespace: str,
                 name: str) -> bool:
        def bound(binding: Obj) -> bool:
            return any(s.get("kind") == "ServiceAccount" and s.get("name") == sa_name
                       and s.get("namespace", binding["metadata"].get("namespace")) == sa_ns
                       for s in binding.get("subjects") or [])

        def rules(ref: Obj, binding_ns: str | None) -> list[Obj]:
            if ref.get("kind") == "ClusterRole":
                role = self.store.find("clusterroles", "", ref["name"])
            else:
                role = self.store.find("roles", binding_ns or "", ref["name"])
            return (role or {}).get("rules") or []

        cluster_bindings, _, _ = self.store.list("clusterrolebindings", None)
        for binding in cluster_bindings:
            if bound(binding) and any(_grants(r, verb, group, resource, name) for r in rules(binding["roleRef"], None)):
                return True
        if namespace:
            bindings, _, _ = self.store.list("rolebindings", namespace)
            for binding in bindings:
                if bound(binding) and any(_grants(r, verb, group, resource, name)
                                          for r in rules(binding["roleRef"], namespace)):
                    return True
        return False
