"""Object names and labels for one session's Kubernetes objects.

Every name is derived from the session id alone, so it is stable (the same id always gives the same
names, across API restarts and template changes) and unique per namespace (different ids give different
names). Valid session ids (``schemas.SESSION_ID_RE``, at most 32 characters) map one to one; anything
else is sanitised and gets a hash suffix so two odd ids cannot collide.
"""

from __future__ import annotations

import hashlib
import re

from api.schemas import SESSION_ID_RE

PREFIX = "orz"
ODD_PREFIX = "orzx"
PART_OF = "orzbob-cloud"
MANAGED_BY = "orzbob-cloud-api"
APP_NAME = "orzbob-session"
SESSION_LABEL = "orz.cloud/session"
ORG_LABEL = "orz.cloud/org"
GENERATION_ANNOTATION = "orz.cloud/generation"
RUNNER_CONTAINER = "runner"  # the session Pod's own container (sidecars are named by their service)

# RFC 1123 label: what Pods, Secrets, PVCs, ConfigMaps and NetworkPolicies all accept as a name.
DNS1123_LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
LABEL_VALUE_RE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)?$")
# Longest suffix we append ("-env"), so the base must leave room for it within 63 characters.
_MAX_BASE = 63 - len("-env")


def _digest(value: str, length: int = 8) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:length]


def base_name(session_id: str) -> str:
    """``orz-<id>``: the name of the session's root ConfigMap, its Pod and its NetworkPolicy."""
    if SESSION_ID_RE.match(session_id):
        return f"{PREFIX}-{session_id}"
    cleaned = re.sub(r"[^a-z0-9-]+", "-", session_id.lower()).strip("-")
    tail = _digest(session_id, 12)
    head = cleaned[: _MAX_BASE - len(ODD_PREFIX) - len(tail) - 2].strip("-")
    return f"{ODD_PREFIX}-{head}-{tail}" if head else f"{ODD_PREFIX}-{tail}"


def root_name(session_id: str) -> str:
    return base_name(session_id)


def pod_name(session_id: str) -> str:
    return base_name(session_id)


def pvc_name(session_id: str) -> str:
    return f"{base_name(session_id)}-ws"


def secret_name(session_id: str) -> str:
    return f"{base_name(session_id)}-env"


def network_policy_name(session_id: str) -> str:
    return base_name(session_id)


def label_value(value: str) -> str:
    """``value`` if it is a valid label value, else a sanitised form with a hash suffix."""
    if LABEL_VALUE_RE.match(value):
        return value
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", value).strip("-_.")[:50].strip("-_.")
    return f"{cleaned}-{_digest(value)}" if cleaned else _digest(value)


def session_selector(session_id: str) -> dict[str, str]:
    """Labels that pick out one session's objects."""
    return {SESSION_LABEL: label_value(session_id), "app.kubernetes.io/managed-by": MANAGED_BY}


def managed_selector() -> str:
    """Label selector (string form) for every object this provider manages."""
    return f"app.kubernetes.io/managed-by={MANAGED_BY},{SESSION_LABEL}"


def labels(session_id: str, org_id: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": APP_NAME,
        "app.kubernetes.io/instance": base_name(session_id),
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": PART_OF,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        SESSION_LABEL: label_value(session_id),
        ORG_LABEL: label_value(org_id),
    }


def parse_selector(text: str) -> dict[str, str]:
    """``"a=b,c=d"`` → ``{"a": "b", "c": "d"}``; equality selectors only, as NetworkPolicy needs."""
    result: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"selector term {part!r} is not key=value")
        result[key.strip()] = value.strip().lstrip("=")
    if not result:
        raise ValueError("selector is empty")
    return result
