"""HTTP pieces of the web door: responses, origin checks, request paths, and the static files."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from api.addresses import client_address as client_address  # the door's callers read it here
from api.log import without_credentials

STATIC_DIR = Path(__file__).resolve().parent / "static"
SESSION_PART = r"(?P<sid>[A-Za-z0-9][A-Za-z0-9_.-]{0,63})"
SIGNIN_KEY = r"(?P<key>[A-Za-z0-9_-]{32})"
ROUTES = {
    # Before "page": these two are the browser sign-in's, not session ids.
    "login": re.compile(r"^/s/login$"),
    "callback": re.compile(r"^/s/callback$"),
    "attach": re.compile(rf"^/v1/instances/{SESSION_PART}/attach$"),
    "ssh": re.compile(rf"^/v1/instances/{SESSION_PART}/ssh$"),
    "page": re.compile(rf"^/s/{SESSION_PART}$"),
    # The signed-in browser's keyed paths first (gateway/web_signin.py): /s/k/<key>/<id>/token|recording.
    "token": re.compile(rf"^/s/(?:k/{SIGNIN_KEY}/)?{SESSION_PART}/token$"),
    "replay": re.compile(rf"^/s/{SESSION_PART}/replay$"),
    "recording": re.compile(rf"^/s/(?:k/{SIGNIN_KEY}/)?{SESSION_PART}/recording$"),
    "forget": re.compile(rf"^/s/k/{SIGNIN_KEY}/forget$"),  # the page's Forget: revoke, clear the cookie
    "static": re.compile(r"^/static/(?P<file>[A-Za-z0-9_./-]{1,200})$"),
    "health": re.compile(r"^/healthz$"),
    "ready": re.compile(r"^/readyz$"),
}
CONTENT_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".html": "text/html; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
# The page loads only its own scripts and styles and talks only to this host (xterm.js sets inline styles).
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@dataclass(frozen=True)
class Target:
    """What a request asks for: a route name, the session id (or static file), the query, and the browser
    sign-in's key when the path carries one."""

    kind: str
    arg: str
    query: dict[str, str]
    key: str = ""


def parse_target(raw_path: str) -> Target | None:
    parts = urlsplit(raw_path)
    query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    for kind, pattern in ROUTES.items():
        m = pattern.match(parts.path)
        if m:
            groups = m.groupdict()
            return Target(kind, groups.get("sid") or groups.get("file") or "", query, groups.get("key") or "")
    return None


def loggable_path(raw_path: str) -> str:
    """The path without its query string (attach tokens ride in the query), a sign-in's key, and a token's
    value pasted into the path cut to its kind and lookup prefix (as the API's access log cuts it): none of
    them reaches a log."""
    return without_credentials(re.sub(r"^/s/k/[^/]+/", "/s/k/.../", urlsplit(raw_path).path))[:200]


def response(status: int, body: bytes = b"", content_type: str = "text/plain; charset=utf-8",
             extra: dict[str, str] | None = None) -> Response:
    headers = Headers()
    headers["Content-Type"] = content_type
    headers["Content-Length"] = str(len(body))
    headers["Cache-Control"] = "no-store"
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Referrer-Policy"] = "no-referrer"
    headers["Connection"] = "close"
    for key, value in (extra or {}).items():
        headers[key] = value
    return Response(status, HTTPStatus(status).phrase, headers, body)


def text(status: int, line: str) -> Response:
    return response(status, (line + "\n").encode())


# The API's connection cap refused the gateway's own connection (api/serve.py): its "too many connections from
# your address" is about the gateway's address, not the browser's.
API_BUSY = "Orzbob Cloud is busy right now; try again in a moment"


def api_refusal(status: int, code: str, detail: str) -> tuple[int, str]:
    """What the browser is told of an API refusal: its status and sentence (5xx as 502), except the API's cap
    on the gateway's connections, which is 503 and API_BUSY."""
    if code == "too_many_connections":
        return 503, API_BUSY
    return (status if 400 <= status < 500 else 502), detail


def json_response(status: int, payload: dict[str, object]) -> Response:
    return response(status, json.dumps(payload).encode(), "application/json")


def is_upgrade(request: Request) -> bool:
    upgrade = request.headers.get("Upgrade", "")
    return upgrade.lower() == "websocket"


def origin_allowed(request: Request, allowed: frozenset[str]) -> bool:
    """Browsers always send Origin: accept this host's own origin and configured ones.

    Clients that are not browsers (the CLI proxy, scripts) send none; they cannot be driven by a hostile
    page, and the token in the URL is their credential.
    """
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    origin = origin.rstrip("/").lower()
    host = request.headers.get("Host", "").lower()
    return origin in allowed or origin in (f"http://{host}", f"https://{host}")


def configured_origins(public_web_url: str) -> frozenset[str]:
    """The public web URL as a browser origin (ws/wss mapped to http/https)."""
    if not public_web_url:
        return frozenset()
    parts = urlsplit(public_web_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return frozenset({f"{scheme}://{parts.netloc}".lower()})


def static_file(name: str) -> Response:
    """A file under gateway/static (no directory escapes; only known types)."""
    path = (STATIC_DIR / name).resolve()
    if STATIC_DIR not in path.parents or not path.is_file() or path.suffix not in CONTENT_TYPES:
        return text(404, "not found")
    # Vendored files are versioned by the package; a day of caching is safe and saves reloads on phones.
    return response(200, path.read_bytes(), CONTENT_TYPES[path.suffix],
                    {"Cache-Control": "public, max-age=86400"})


def signin_links(providers: Mapping[str, str], next_path: str) -> str:
    """The page's "Sign in with ..." links, one per configured provider (Settings.signin_providers), each back
    to ``next_path``; empty when none is configured (the page then offers only its API token field)."""
    links = [
        f'<a class="signin" data-provider="{html.escape(key)}" href="/s/login?'
        f'{html.escape(urlencode({"next": next_path, "provider": key}))}">Sign in with {html.escape(name)}</a>'
        for key, name in providers.items()
    ]
    return f'<span id="signin">{" or ".join(links)}</span>, or\n  ' if links else ""


@dataclass(frozen=True)
class Page:
    """A page of the web door: its own part (a file in static/), placed in the shell every page shares
    (static/page.html: the head and the sign-in form)."""

    title: str  # after the session id in the browser's title
    submit: str  # the sign-in form's button
    back_to: str  # after /s/{id}: where signing in returns to


SHELL = "page.html"
PAGES = {"terminal.html": Page(title="", submit="Connect", back_to=""),
         "replay.html": Page(title=" replay", submit="Load", back_to="/replay")}


def terminal_page(session_id: str, page: str = "terminal.html", signin: Mapping[str, str] | None = None) -> Response:
    """The browser terminal page (or ``page``: the replay page) for one session, with ``signin``'s links."""
    shown = PAGES[page]
    body = ((STATIC_DIR / SHELL).read_text().replace("{{BODY}}", (STATIC_DIR / page).read_text())
            .replace("{{TITLE}}", "{{SESSION}}" + shown.title).replace("{{SUBMIT}}", shown.submit))
    # The session id is a checked name (SESSION_PART); the links are escaped where they are made.
    body = body.replace("{{SIGNIN}}", signin_links(signin or {}, f"/s/{session_id}{shown.back_to}"))
    return response(200, body.replace("{{SESSION}}", session_id).encode(), CONTENT_TYPES[".html"],
                    {"Content-Security-Policy": PAGE_CSP, "X-Frame-Options": "DENY"})
