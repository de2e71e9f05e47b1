"""The CLI's own files: the token file (`~/.config/orzbob/token.json`, mode 0600) and key directory."""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_API_URL = "http://127.0.0.1:8080"
# Minted API tokens last until revoked. The Go CLI reads this same file and treats a missing `expires_at`
# as expired, so for those the file names a time it will not reach. A sign-in's token has a real expiry,
# and a `refresh_token` this CLI uses to get the next one silently.
GO_CLI_EXPIRES_AT = "9999-12-31T23:59:59Z"


def api_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be the API's address, or None. Either would otherwise fail late and unclearly: a URL
    without a scheme as an API that "cannot be reached" (retried for 10 s), /v1 as "no such endpoint"."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"is not an http:// or https:// URL (e.g. {DEFAULT_API_URL})"
    base = url.rstrip("/")
    if base.endswith("/v1"):
        return f"names the API's /v1 path; give the server's address without /v1 (e.g. {base.removesuffix('/v1')})"
    return None


def cleartext_problem(url: str) -> str | None:
    """Why logging in to ``url`` would expose the login, or None: plain http to a host other than this machine."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme != "http" or host == "localhost" or host.endswith(".localhost"):
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass
    return (f"{url} is plain http: your token, and the gateway host key the CLI pins, cross the network "
            "unencrypted and unauthenticated; use the server's https:// address")


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "orzbob"


def token_path() -> Path:
    return config_dir() / "token.json"


@dataclass(frozen=True)
class Credentials:
    api_url: str
    api_token: str
    # Set for a sign-in's token (orz cloud login without a token); None: valid until revoked.
    expires_at: datetime | None = None
    refresh_token: str | None = None
    source: str | None = None

    def expires_within(self, seconds: float) -> bool:
        if self.expires_at is None:
            return False
        return (self.expires_at - datetime.now(UTC)).total_seconds() < seconds


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value or value == GO_CLI_EXPIRES_AT:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def load_credentials() -> Credentials | None:
    """The saved login, with ORZBOB_API_URL taking precedence for the URL."""
    path = token_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    token = data.get("api_token") if isinstance(data, dict) else None
    if not token:
        return None
    url = os.environ.get("ORZBOB_API_URL") or data.get("api_url") or DEFAULT_API_URL
    refresh = data.get("refresh_token")
    return Credentials(api_url=str(url).rstrip("/"), api_token=str(token),
                       expires_at=_parse_time(data.get("expires_at")), refresh_token=str(refresh) if refresh else None,
                       source=str(data["source"]) if data.get("source") else None)


def save_credentials(creds: Credentials) -> Path:
    """Write the token file atomically, readable only by its owner."""
    path = token_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        expires = creds.expires_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if creds.expires_at else None
        data: dict[str, str] = {"api_url": creds.api_url, "api_token": creds.api_token,
                                "expires_at": expires or GO_CLI_EXPIRES_AT}
        if creds.refresh_token:
            data["refresh_token"] = creds.refresh_token
        if creds.source:
            data["source"] = creds.source
        json.dump(data, fh)
        fh.write("\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def forget_credentials() -> bool:
    try:
        token_path().unlink()
        return True
    except FileNotFoundError:
        return False
