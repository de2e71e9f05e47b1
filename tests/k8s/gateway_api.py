"""A structural check of Gateway API HTTPRoutes (gateway.networking.k8s.io/v1), and their routing.

kubernetes-validate knows only the core Kubernetes schemas, not the Gateway API's CRDs, so this JSON
schema is written here from the Gateway API specification (the standard channel's HTTPRoute: fields,
enums, patterns and limits of its OpenAPI schema), with the CRD's CEL rules that matter for our routes
as code (a path value starts with "/"; a backendRef to a Service names its port). It is strict: unknown
fields fail, as they would with the API server's strict field validation. It covers the fields a route
of this chart can use; experimental-channel fields are left out on purpose.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jsonschema

HOSTNAME = {"type": "string", "minLength": 1, "maxLength": 253,
            "pattern": r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"}
DNS_SUBDOMAIN = {"type": "string", "minLength": 1, "maxLength": 253,
                 "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"}
NAMESPACE = {"type": "string", "minLength": 1, "maxLength": 63, "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}
GROUP = {"type": "string", "maxLength": 253,
         "pattern": r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"}
KIND = {"type": "string", "minLength": 1, "maxLength": 63, "pattern": r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
HEADER_NAME = {"type": "string", "minLength": 1, "maxLength": 256, "pattern": r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$"}
DURATION = {"type": "string", "pattern": r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"}


def _strict(properties: Mapping[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "properties": dict(properties),
            "required": list(required)}


PARENT_REF = _strict({"group": GROUP, "kind": KIND, "namespace": NAMESPACE,
                      "name": {"type": "string", "minLength": 1, "maxLength": 253},
                      "sectionName": DNS_SUBDOMAIN, "port": PORT}, ("name",))
BACKEND_REF = _strict({"group": GROUP, "kind": KIND, "name": {"type": "string", "minLength": 1, "maxLength": 253},
                       "namespace": NAMESPACE, "port": PORT,
                       "weight": {"type": "integer", "minimum": 0, "maximum": 1000000},
                       "filters": {"type": "array", "maxItems": 16, "items": {"type": "object"}}}, ("name",))
MATCH = _strict({
    "path": _strict({"type": {"enum": ["Exact", "PathPrefix", "RegularExpression"]},
                     "value": {"type": "string", "maxLength": 1024}}),
    "headers": {"type": "array", "maxItems": 16, "items": _strict(
        {"type": {"enum": ["Exact", "RegularExpression"]}, "name": HEADER_NAME,
         "value": {"type": "string", "minLength": 1, "maxLength": 4096}}, ("name", "value"))},
    "queryParams": {"type": "array", "maxItems": 16, "items": _strict(
        {"type": {"enum": ["Exact", "RegularExpression"]}, "name": HEADER_NAME,
         "value": {"type": "string", "minLength": 1, "maxLength": 1024}}, ("name", "value"))},
    "method": {"enum": ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"]},
})
FILTER = {"type": "object", "required": ["type"], "properties": {"type": {"enum": [
    "RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror", "RequestRedirect", "URLRewrite",
    "ExtensionRef"]}}}
RULE = _strict({"matches": {"type": "array", "maxItems": 8, "items": MATCH},
                "filters": {"type": "array", "maxItems": 16, "items": FILTER},
                "backendRefs": {"type": "array", "maxItems": 16, "items": BACKEND_REF},
                "timeouts": _strict({"request": DURATION, "backendRequest": DURATION})})
METADATA = {"type": "object", "required": ["name"], "properties": {
    "name": DNS_SUBDOMAIN, "namespace": NAMESPACE,
    "labels": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 63}},
    "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}
HTTPROUTE = _strict({
    "apiVersion": {"const": "gateway.networking.k8s.io/v1"},
    "kind": {"const": "HTTPRoute"},
    "metadata": METADATA,
    "spec": _strict({"parentRefs": {"type": "array", "maxItems": 32, "items": PARENT_REF},
                     "hostnames": {"type": "array", "maxItems": 16, "items": HOSTNAME},
                     "rules": {"type": "array", "maxItems": 16, "items": RULE}}),
}, ("apiVersion", "kind", "metadata", "spec"))


class RouteInvalid(ValueError):
    """The HTTPRoute would be refused by an API server with the Gateway API CRDs installed."""


def validate_httproute(obj: Mapping[str, Any]) -> None:
    try:
        jsonschema.validate(dict(obj), HTTPROUTE)
    except jsonschema.ValidationError as exc:
        raise RouteInvalid(f"{exc.message} at {list(exc.absolute_path)}") from None
    for rule in obj["spec"].get("rules") or []:
        for match in rule.get("matches") or []:
            path = match.get("path") or {}
            if path.get("type", "PathPrefix") != "RegularExpression" and not path.get("value", "/").startswith("/"):
                raise RouteInvalid("a path match's value must be an absolute path")
        for ref in rule.get("backendRefs") or []:
            if ref.get("group", "") == "" and ref.get("kind", "Service") == "Service" and "port" not in ref:
                raise RouteInvalid("a backendRef to a Service must name its port")


def route(routes: list[Mapping[str, Any]], host: str, path: str) -> tuple[str, int] | None:
    """Where a Gateway sends host+path among these routes (Exact before the longest PathPrefix; a
    PathPrefix matches whole path segments), or None (404)."""
    best: tuple[int, tuple[str, int]] | None = None
    for r in routes:
        hostnames = r["spec"].get("hostnames") or []
        if hostnames and not any(h == host or (h.startswith("*.") and host.endswith(h[1:])) for h in hostnames):
            continue
        for rule in r["spec"].get("rules") or []:
            (ref,) = rule["backendRefs"]
            target = (ref["name"], ref["port"])
            for match in rule.get("matches") or [{"path": {"type": "PathPrefix", "value": "/"}}]:
                kind, value = match["path"].get("type", "PathPrefix"), match["path"].get("value", "/")
                if kind == "Exact" and path == value:
                    return target
                prefix = value.rstrip("/")
                matches = kind == "PathPrefix" and (path == prefix or path.startswith(prefix + "/"))
                if matches and (best is None or len(prefix) > best[0]):
                    best = (len(prefix), target)
    return best[1] if best else None
