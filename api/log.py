"""Logging set-up: one JSON object per line, with request/session/user ids when known."""

from __future__ import annotations

import json
import logging
import re
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

# Set per request / connection so every line logged while handling it carries the ids.
log_context: ContextVar[dict[str, str]] = ContextVar("orz_log_context", default={})  # noqa: B039

_STD_ATTRS = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}

# Last line of defence, not the policy (the policy is: never log a credential). Anything shaped like
# one of our credentials is cut to what is safe to show: a token's kind and lookup prefix, nothing of
# a JWT or a bearer header's value.
# Every credential the platform mints: API (orz_), runner (orzr_), refresh (orzrt_) tokens and device codes (orzd_).
_TOKEN = re.compile(r"\b(orz(?:r|rt|d)?_[A-Za-z0-9_-]{8})[A-Za-z0-9_-]{8,}")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]{8,}")


def redact(text: str) -> str:
    if "_" not in text and "eyJ" not in text and "earer" not in text:
        return text  # the common case: nothing to look at
    text = _TOKEN.sub(r"\1...", text)
    text = _JWT.sub("<jwt>", text)
    return _BEARER.sub(r"\1 <redacted>", text)



# A token's value (an API or runner token, a JWT) pasted where an id belongs: a path, or a path segment on
# its own (a session id). The API's problem `instance`, its access log line and log context, and the
# gateway's web door's log lines repeat the path or the id, and must not repeat the token.
_TOKEN_SEGMENT = re.compile(
    r"(?<![A-Za-z0-9_-])(orz(?:r|rt|d)?_[A-Za-z0-9_-]{8})[A-Za-z0-9_-]{9,}|(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_.-]{10,}")


def without_credentials(path: str) -> str:
    """`path` (or one segment of it) with any token's value cut to its kind and lookup prefix."""
    return _TOKEN_SEGMENT.sub(lambda m: (m.group(1) or "eyJ") + "...", path)

class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        entry.update(log_context.get())
        for key, value in vars(record).items():
            if key in _STD_ATTRS or key.startswith("_"):
                continue
            if value is None and key in entry:
                continue  # an empty `extra` does not hide an id bound to the context
            entry[key] = redact(value) if isinstance(value, str) else (
                value if isinstance(value, int | float | bool | None) else redact(str(value)))
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


def bind(**ids: str | None) -> None:
    """Add ids (request_id, session_id, user_id, conn_id) to every log line of the current task."""
    log_context.set({**log_context.get(), **{k: v for k, v in ids.items() if v}})


def new_context(**ids: str | None) -> None:
    """Start a fresh set of ids: one task serves every request of a keep-alive connection, so the
    ids of the previous request must not carry over to the next one."""
    log_context.set({k: v for k, v in ids.items() if v})


class _NoFrameworkAdvice(logging.Filter):
    """Sanic's warning on a terminal, "Sanic is running in PRODUCTION mode. Consider using '--debug' or '--dev'
    ...": flags no orz command has, about a library its users never chose (`make dev` printed it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "running in PRODUCTION mode" not in record.getMessage()


def configure(level: str = "INFO", json_lines: bool = True, stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Sanic configures its own loggers; route them through ours.
    for name in ("sanic.root", "sanic.error", "sanic.access", "sanic.server"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
        if not any(isinstance(f, _NoFrameworkAdvice) for f in lg.filters):
            lg.addFilter(_NoFrameworkAdvice())
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    # The runner's (and gateway's) API client: one line per request is the access log's job, not theirs.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # Alembic says "Context impl ..." whenever the schema is read, and "Running upgrade" per migration,
    # which `orz admin migrate` prints itself, as a sentence.
    logging.getLogger("alembic").setLevel(logging.WARNING)
