"""Request parsing and response rendering shared by every route."""

from __future__ import annotations

import json
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from sanic import HTTPResponse, Request

from api.errors import BadRequest, PayloadTooLarge, ValidationFailed
from api.schemas import describe_validation, validation_errors

M = TypeVar("M", bound=BaseModel)


def parse_body(request: Request, model: type[M], *, allow_empty: bool = False) -> M:
    """Parse and validate a JSON body; any content type is read as JSON (curl -d sends a form type)."""
    raw = request.body or b""
    # Sanic's own limit only applies to its HTTP server; check again so ASGI deployments get it too.
    if len(raw) > request.app.config.REQUEST_MAX_SIZE:
        raise PayloadTooLarge("request body is too large")
    if not raw and allow_empty:
        return model()
    if not raw.strip():
        # Whitespace is not "no body": it is a body that is not JSON.
        raise BadRequest("a JSON object body is required")
    try:
        data = json.loads(raw)
    except RecursionError:
        raise BadRequest("body is not valid JSON: nested too deeply") from None
    except UnicodeDecodeError:
        # The codec's message quotes the offending byte, which may be part of a secret value.
        raise BadRequest("body is not valid UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        # Only the reason and position: exc.doc (the input) is never echoed.
        raise BadRequest(f"body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError:
        # An integer past Python's digit limit (4300): a ValueError, not a JSON error, and no 500 for anyone.
        raise BadRequest("body is not valid JSON: a number has more digits than the API reads") from None
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object")
    try:
        # Strict: "true" is not a boolean and "5" is not a number; JSON mode still reads ISO datetimes.
        return model.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        invalid = [e for e in exc.errors(include_url=False, include_input=False) if e["type"] == "json_invalid"]
        if invalid:
            # What the stricter parser refuses (nesting past its limit, lone surrogates) is bad JSON too.
            raise BadRequest(f"body is not valid JSON: {invalid[0]['ctx']['error']}") from None
        raise ValidationFailed(describe_validation(exc), errors=validation_errors(exc)) from None


FLAG_VALUES = {"true": True, "1": True, "false": False, "0": False}


def query_flag(request: Request, name: str) -> bool:
    """A boolean query parameter (``?force=true``); absent is false, anything but true/false/1/0 a 422."""
    # With its blanks: Sanic's request.args drops `?force=`, which would read as false instead of refused.
    value = request.get_args(keep_blank_values=True).get(name)
    if value is None:
        return False
    flag = FLAG_VALUES.get(value.lower())
    if flag is None:
        raise ValidationFailed.of(name, f"{name} must be true or false")
    return flag


def respond(model: BaseModel, status: int = 200) -> HTTPResponse:
    return HTTPResponse(
        model.model_dump_json(), status=status, content_type="application/json"
    )

