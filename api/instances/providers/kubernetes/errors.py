"""Turn Kubernetes API and transport errors into ProviderFailure reasons a user may read.

Reasons name what failed and what to do; they never carry request bodies, headers or secret values
(a 422 message is echoed only after every known secret value has been scrubbed from it).
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterable

import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from api.instances.providers.base import ProviderFailure

_QUOTA_RE = re.compile(r"exceeded quota: ([^,]+)")
_MAX_DETAIL = 300


def _api_message(exc: ApiException) -> str:
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        return ""
    return str(body.get("message", "")) if isinstance(body, dict) else ""


def _scrub(text: str, secrets: Iterable[str]) -> str:
    for value in secrets:
        if value and len(value) >= 4:
            text = text.replace(value, "<redacted>")
    return text[:_MAX_DETAIL]


def is_status(exc: BaseException, *codes: int) -> bool:
    return isinstance(exc, ApiException) and exc.status in codes


def failure(exc: BaseException, action: str, namespace: str, secrets: Iterable[str] = ()) -> ProviderFailure:
    """A ProviderFailure for ``exc`` raised while doing ``action`` (e.g. "create the pod")."""
    if isinstance(exc, ProviderFailure):
        return exc
    if isinstance(exc, ApiException):
        status = int(exc.status or 0)
        message = _api_message(exc)
        quota = _QUOTA_RE.search(message)
        if status in (403, 422) and quota:
            return ProviderFailure(
                f"could not {action}: the cluster's quota {quota.group(1)!r} for sessions is used up; "
                "stop another session or ask an operator to raise it"
            )
        if status == 403:
            return ProviderFailure(
                f"could not {action}: the API is not allowed to in namespace {namespace!r} "
                "(check the chart's Role and RoleBinding)"
            )
        if status == 409:
            return ProviderFailure(f"could not {action}: it conflicts with a change made meanwhile; retry")
        if status in (400, 422):
            detail = _scrub(message, secrets) or "invalid object"
            return ProviderFailure(f"could not {action}: Kubernetes rejected it: {detail}")
        if status == 404:
            return ProviderFailure(f"could not {action}: namespace {namespace!r} or the object is missing")
        if status == 401:
            return ProviderFailure(f"could not {action}: the API's Kubernetes credentials were refused")
        if status == 429:
            return ProviderFailure(f"could not {action}: the Kubernetes API is overloaded; try again shortly")
        if status == 0 or status >= 500:
            return ProviderFailure(f"could not {action}: the Kubernetes API is unavailable (HTTP {status})")
        return ProviderFailure(f"could not {action}: the Kubernetes API answered HTTP {status}")
    cause = exc.reason if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason else exc
    # NewConnectionError subclasses ConnectTimeoutError in urllib3 2: test for it first.
    if isinstance(cause, urllib3.exceptions.NewConnectionError | ConnectionError):
        return ProviderFailure(f"could not {action}: the Kubernetes API could not be reached")
    if isinstance(cause, urllib3.exceptions.TimeoutError | socket.timeout | TimeoutError):
        return ProviderFailure(f"could not {action}: the Kubernetes API did not answer in time")
    if isinstance(cause, urllib3.exceptions.HTTPError | OSError):
        return ProviderFailure(f"could not {action}: the Kubernetes API could not be reached")
    return ProviderFailure(f"could not {action}: unexpected error ({type(exc).__name__})")
