"""Routes declare their contract once; the OpenAPI document is built from those declarations."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from sanic import Blueprint

from api import schemas

Security = Literal["api_token", "service_token", "runner_token"] | None
F = TypeVar("F", bound=Callable[..., Any])

ERROR_TITLES = {
    400: "Bad request", 401: "Not authenticated", 403: "Not allowed", 404: "Not found",
    409: "Conflict with the session's state", 413: "Body too large", 422: "Request failed validation",
    429: "Quota reached or too many attempts", 502: "Identity provider failed", 503: "Provider or database unavailable",
}


@dataclass(frozen=True)
class QueryParam:
    """A query parameter of one operation (optional unless ``required``), with its JSON schema.

    Keep patterns plain (no lookarounds): schemathesis cannot generate from those and filters instead."""

    name: str
    schema: dict[str, Any]
    description: str
    required: bool = False


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    tag: str
    request: type[BaseModel] | None
    responses: dict[int, type[BaseModel] | None]
    errors: tuple[int, ...]
    security: Security
    content_type: str = "application/json"
    body_required: bool = True
    query: tuple[QueryParam, ...] = ()


@dataclass
class Registry:
    operations: list[Operation] = field(default_factory=list)
    # (method, path) -> the handler serving it: tests read what each handler takes from the query string.
    handlers: dict[tuple[str, str], Callable[..., Any]] = field(default_factory=dict)


REGISTRY = Registry()


def route(
    bp: Blueprint,
    method: str,
    path: str,
    *,
    summary: str,
    tag: str,
    responses: dict[int, type[BaseModel] | None],
    request: type[BaseModel] | None = None,
    errors: tuple[int, ...] = (),
    security: Security = "api_token",
    content_type: str = "application/json",
    body_required: bool = True,
    query: tuple[QueryParam, ...] = (),
) -> Callable[[F], F]:
    """Register a handler on ``bp`` and describe it in the OpenAPI document, from one declaration."""
    # Every authenticated route reads the database: when it is unreachable the answer is a retryable 503.
    auth_errors = (401, 503) if security else ()
    body_errors = (400, 413, 422) if request else ()
    op = Operation(method.upper(), path, summary, tag, request, responses,
                   tuple(sorted(set(errors) | set(auth_errors) | set(body_errors))), security, content_type,
                   body_required, query)
    REGISTRY.operations.append(op)
    sanic_path = path.replace("{", "<").replace("}", ">")

    def decorate(handler: F) -> F:
        bp.add_route(handler, sanic_path, methods=[op.method], name=handler.__name__)
        REGISTRY.handlers[(op.method, op.path)] = handler
        return handler

    return decorate


INTERNAL_PREFIX = "/internal/"


def build_document(version: str, *, internal: bool = False) -> dict[str, Any]:
    """The OpenAPI document. The one served at /v1/openapi.json (``internal`` False) is for users: the
    gateway's and runners' /internal/ routes, and the schemas and credentials only they use, are left out.
    ``internal``: every route, for the contract tests."""
    operations = [op for op in REGISTRY.operations if internal or not op.path.startswith(INTERNAL_PREFIX)]
    models: set[type[BaseModel]] = {schemas.Problem}
    for op in operations:
        if op.request:
            models.add(op.request)
        models.update(m for m in op.responses.values() if m)
    inputs = [(m, "validation") for m in models if issubclass(m, schemas.Request)]
    outputs = [(m, "serialization") for m in models if not issubclass(m, schemas.Request)]
    _, defs = models_json_schema(inputs + outputs, ref_template="#/components/schemas/{model}")  # type: ignore[arg-type]
    components = defs.get("$defs", {})

    paths: dict[str, dict[str, Any]] = {}
    for op in sorted(operations, key=lambda o: (o.path, o.method)):
        item: dict[str, Any] = {
            "summary": op.summary,
            "operationId": _operation_id(op),
            "tags": [op.tag],
            "responses": {},
        }
        params = [seg[1:-1] for seg in op.path.split("/") if seg.startswith("{")]
        parameters: list[dict[str, Any]] = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params]
        parameters += [{"name": q.name, "in": "query", "required": q.required, "schema": q.schema,
                        "description": q.description} for q in op.query]
        if parameters:
            item["parameters"] = parameters
        if op.security:
            item["security"] = [{op.security: []}]
        if op.request:
            item["requestBody"] = {
                "required": op.body_required,
                "content": {"application/json": {"schema": {"$ref": _ref(op.request)}}},
            }
        for status, model in op.responses.items():
            if model is None and op.content_type != "application/json":  # a body that is not JSON
                item["responses"][str(status)] = {
                    "description": op.summary, "content": {op.content_type: {"schema": {"type": "string"}}}}
            elif model is None:
                item["responses"][str(status)] = {"description": "No content"}
            else:
                item["responses"][str(status)] = {
                    "description": model.__doc__.strip().splitlines()[0] if model.__doc__ else model.__name__,
                    "content": {op.content_type: {"schema": {"$ref": _ref(model)}}},
                }
        for status in op.errors:
            item["responses"][str(status)] = {
                "description": ERROR_TITLES.get(status, "Error"),
                "content": {"application/problem+json": {"schema": {"$ref": _ref(schemas.Problem)}}},
            }
        paths.setdefault(op.path, {})[op.method.lower()] = item

    return {
        "openapi": "3.1.0",
        "info": {"title": "Orzbob Cloud API", "version": version},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {name: scheme for name, scheme in SECURITY_SCHEMES.items()
                                if any(op.security == name for op in operations) or name == "api_token"},
        },
    }


SECURITY_SCHEMES: dict[str, dict[str, str]] = {
    "api_token": {"type": "http", "scheme": "bearer", "description": "API token (orz_...)"},
    "service_token": {"type": "http", "scheme": "bearer", "description": "Gateway service token"},
    "runner_token": {"type": "http", "scheme": "bearer", "description": "Per-session runner token"},
}


def _ref(model: type[BaseModel]) -> str:
    return f"#/components/schemas/{model.__name__}"


def _operation_id(op: Operation) -> str:
    path = op.path.strip("/").replace("/", "_").replace("{", "").replace("}", "").replace("-", "_")
    return f"{op.method.lower()}_{path}"
