"""The one settings object for every Orzbob Cloud service, read from ``ORZ_*`` environment variables.

It lives beside the API's contract modules (``schemas``, ``client``) and, like them, imports nothing
heavy, so the gateway, the runner and the CLI read their configuration from the same place. Attribute
access stays flat (``settings.ssh_port``); each setting carries a help text and the component it belongs
to (``option``), from which ``python -m api.settings --markdown`` makes README's configuration table.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings, SettingsConfigDict

from api.cloud_yaml import DEFAULT_MAX_SERVICES, SERVICES_CEILING
from api.schemas import RECORDING_MIN_BYTES, error_message

ProviderName = Literal["local", "kubernetes", "fake"]


def _split_list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


_QUANTITY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9}


def quantity_bytes(value: str | None) -> int | None:
    """Bytes of a Kubernetes-style quantity ("4Gi", "500M", "1048576"); None for empty or unreadable."""
    if not value:
        return None
    for suffix, scale in _QUANTITY_UNITS.items():
        if value.endswith(suffix) and value[: -len(suffix)].replace(".", "", 1).isdigit():
            return int(float(value[: -len(suffix)]) * scale)
    return int(value) if value.isdigit() else None


def default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "orzbob"


# The components settings belong to, with their headings, in the order the configuration table shows them.
Group = Literal["storage", "api", "gateway", "credentials", "sign-in", "sessions", "scheduler", "plans",
                "repositories", "webhooks", "sandbox", "kubernetes", "runner", "logging"]
GROUPS: dict[Group, str] = {
    "storage": "Storage",
    "api": "API",
    "gateway": "Gateway",
    "credentials": "Keys, certificates and tokens",
    "sign-in": "Sign-in",
    "sessions": "Sessions",
    "scheduler": "Scheduler",
    "plans": "Plans",
    "repositories": "Repository URLs",
    "webhooks": "Webhooks",
    "sandbox": "Local provider sandbox",
    "kubernetes": "Kubernetes provider",
    "runner": "Runner (set by the provider, inside a session)",
    "logging": "Logging",
}


def option(group: Group, default: Any = PydanticUndefined, doc: str = "", *, shown: str | None = None,
           **field: Any) -> Any:
    """A setting: pydantic's Field with its help text and component. ``shown``: the default as the
    configuration table says it, when the value itself is derived or machine-specific."""
    extra: dict[str, Any] = {"group": group}
    if shown is not None:
        extra["shown_default"] = shown
    return Field(default, description=doc, json_schema_extra=extra, **field)


class Settings(BaseSettings):
    """Deployment configuration. Frozen: build a new one (``model_copy(update=...)``) to change it."""

    model_config = SettingsConfigDict(env_prefix="ORZ_", frozen=True, extra="ignore")

    # Storage
    data_dir: Path = option("storage", doc="database, keys and session workspaces of the embedded default",
                            default_factory=default_data_dir, shown="`~/.local/share/orzbob`")
    database_url: str = option("storage", "", "`postgresql://...` for PostgreSQL (asyncpg); empty: SQLite in the "
                               "data dir", shown="SQLite in the data dir")
    require_schema_head: bool = option("storage", True, "refuse to serve from a database schema this code does "
                                       "not match (fail fast)")
    schema_wait_s: int = option("storage", 300, "how long `orz api` and `orz scheduler` wait, not ready and logging "
                                "why, for the schema to reach this code's head (or a compatible newer one); 0 "
                                "refuses at once", ge=0)
    db_wait_s: int = option("storage", 120, "how long `orz admin migrate` waits for the database to answer", ge=0)

    # API
    api_host: str = option("api", "127.0.0.1", "address the API listens on")
    api_port: int = option("api", 8080, "port the API listens on", ge=0, le=65535)
    api_metrics_port: int = option("api", 0, "`orz api` and `orz server` serve /metrics on `ORZ_API_HOST` at "
                                   "this port, never on `ORZ_API_PORT` (0: off; the chart sets 9101); the "
                                   "embedded server's listener shows its scheduler and gateway too", ge=0, le=65535)
    api_workers: int = option("api", 1, "`orz api` processes sharing `ORZ_API_PORT` (and one metrics listener "
                              "summing them all, through `PROMETHEUS_MULTIPROC_DIR`: a private directory unless "
                              "set); more than 1 needs `ORZ_PROVIDER=kubernetes`, since local runners are children "
                              "of the process that started them", ge=1, le=64)
    public_api_url: str = option("api", "", "how users' CLIs reach the API; empty: from `ORZ_API_HOST` and "
                                 "`ORZ_API_PORT`", shown="from host and port")
    internal_api_url: str = option("api", "", "how the gateway (authorize, attach events, the web door's token "
                                   "requests) and runners (heartbeats, log upload) reach the API: an in-cluster "
                                   "address, so /internal never crosses the public edge (the chart sets the "
                                   "in-cluster Service)", shown="`ORZ_PUBLIC_API_URL`")
    max_request_bytes: int = option("api", 256 * 1024, "largest request body the API accepts", gt=0)
    auth_cache_ttl_s: float = option("api", 1.0, "how long a verified API token is trusted without asking the "
                                     "database again (0 disables)", ge=0, le=60)

    # Gateway. ssh_host/ssh_port are the gateway's listener for users; a runner's own SSH endpoint is
    # RunnerSpec.ssh_host/ssh_port (the names stay: they are the ORZ_SSH_* variables).
    ssh_host: str = option("gateway", "127.0.0.1", "address the SSH gateway listens on for users")
    ssh_port: int = option("gateway", 2222, "port the SSH gateway listens on for users", ge=0, le=65535)
    public_ssh_host: str = option("gateway", "", "the host name users type after the @; empty: `ORZ_SSH_HOST`",
                                  shown="`ORZ_SSH_HOST`")
    public_ssh_port: int = option("gateway", 0, "the port users connect to (it differs behind a load balancer); "
                                  "0: `ORZ_SSH_PORT`", ge=0, le=65535, shown="`ORZ_SSH_PORT`")
    gateway_web_host: str = option("gateway", "127.0.0.1", "address the gateway's web door (browser terminal) "
                                   "listens on")
    gateway_web_port: int = option("gateway", 8443, "port of the web door", ge=0, le=65535)
    public_web_url: str = option("gateway", "", "the web door's address as browsers see it (`https://...`); "
                                 "empty: from `ORZ_GATEWAY_WEB_HOST` and `ORZ_GATEWAY_WEB_PORT`",
                                 shown="from host and port")
    gateway_web_trusted_proxies: str = option("gateway", "", "comma-separated addresses or CIDRs of the TLS "
                                              "proxies in front of the web door; only from these is "
                                              "X-Forwarded-For believed (rate limits and logs then see the "
                                              "browser's address)")
    gateway_metrics_port: int = option("gateway", 0, "`orz gateway` serves /metrics on `ORZ_GATEWAY_WEB_HOST` at "
                                       "this port (0: off)", ge=0, le=65535)
    gateway_host_key_file: Path | None = option("gateway", None, "the gateway's SSH host key; unset: "
                                                "`gateway_host_ed25519` in the data dir's keys (generated)")
    gateway_client_key_file: Path | None = option("gateway", None, "the gateway's client key for its "
                                                  "connections to runners; runners trust only its public half")
    gateway_public_key: str = option("gateway", "", "the public half of the gateway's client key, for the API "
                                     "to hand to runners; unset: read from the key file", shown="from the key file")
    gateway_host_public_key: str = option("gateway", "", "the public half of the gateway's SSH host key, which "
                                          "the API hands to the CLI to pin before its first connection (no "
                                          "trust on first use); unset: read from the host key file's `.pub`, "
                                          "and without one clients trust the key on first use",
                                          shown="from the key file")
    gateway_fast_path: bool = option("gateway", True, "relay session bytes without asyncssh's per-packet channel "
                                     "machinery (`gateway/splice.py`); `false` runs every packet through asyncssh, "
                                     "as a fallback and for comparison")
    gateway_access_check_s: float = option("gateway", 1.0, "how often each gateway asks the API which live "
                                           "attachments must end (user disabled, session deleted, access "
                                           "revoked): one request per gateway per interval", ge=0.1, le=60)
    gateway_reauth_grace_s: float = option("gateway", 300.0, "while the API cannot answer (unreachable, or a "
                                           "5xx), a live connection may still open new channels (`ssh -L`, "
                                           "VS Code, a ControlMaster's exec) if the API last said yes to it "
                                           "less than this many seconds ago; a refusal never passes, nor does "
                                           "a revocation. 0: every new channel needs the API's yes", ge=0)
    # Key exchanges cost CPU before anyone has authenticated: beyond these, new connections are refused at once.
    gateway_preauth_per_source: int = option("gateway", 10, "connections still in the handshake or "
                                             "authenticating, per source address (the web door keeps its own "
                                             "count: connections whose request is not answered yet)", ge=1)
    gateway_preauth_total: int = option("gateway", 256, "connections still in the handshake or authenticating, "
                                        "in all (the SSH and web doors each)", ge=1)
    gateway_attachments_per_user: int = option("gateway", 64, "attached connections (SSH, SSH over the web "
                                               "door, browser terminals) one user may hold open through one "
                                               "gateway replica; beyond it a new one is refused with a line "
                                               "saying so (0: no limit)", ge=0)
    gateway_channels_per_connection: int = option("gateway", 256, "channels (shells, commands, sftp, each -L/-D "
                                                  "connection, agent and -R connections) one SSH connection may have "
                                                  "open at once; beyond it the client's next session or -L/-D "
                                                  "channel is refused with the reason "
                                                  "(VS Code Remote-SSH opens a few dozen)", ge=1)
    gateway_login_timeout_s: int = option("gateway", 20, "a connection not authenticated within this many "
                                          "seconds is closed", ge=1, le=120)
    gateway_drain_s: float = option("gateway", 240.0, "on SIGTERM the gateway stops taking connections, tells "
                                    "attached users it is restarting, and lets open connections run this long at "
                                    "most before a clean SSH disconnect; keep it below the pod's "
                                    "terminationGracePeriodSeconds (the chart derives one from the other)",
                                    ge=0, le=3600)
    auth_fail_limit: int = option("gateway", 10, "failed authentications allowed per source address inside "
                                  "`ORZ_AUTH_FAIL_WINDOW_S`", ge=1)
    auth_fail_window_s: int = option("gateway", 60, "the window of `ORZ_AUTH_FAIL_LIMIT`, in seconds", ge=1)
    service_token: SecretStr = option("gateway", SecretStr(""), "the token the gateway presents to the API's "
                                      "internal routes", shown="generated")

    # Credentials
    ssh_ca_key_file: Path | None = option("credentials", None, "the SSH CA's private key, which signs users' "
                                          "certificates; unset: `ssh_ca` in the data dir's keys (generated)")
    jwt_key_file: Path | None = option("credentials", None, "the ES256 key that signs attach tokens; unset: "
                                       "`jwt_es256.pem` in the data dir's keys (generated)")
    ssh_ca_public_key_file: Path | None = option("credentials", None, "the gateway's trust anchor for "
                                                 "certificates: an OpenSSH line, a PEM public key or a PEM "
                                                 "certificate", shown="`.pub` beside the private key")
    jwt_public_key_file: Path | None = option("credentials", None, "the gateway's trust anchor for attach "
                                              "tokens, in the same forms", shown="`.pub` beside the private key")
    cert_ttl_s: int = option("credentials", 300, "lifetime of the SSH certificates `orz cloud attach` gets",
                             ge=10, le=3600)
    cert_max_ttl_s: int = option("credentials", 300, "the longest certificate a user may ask for (`orz cloud "
                                 "cert --ttl`), for automation that can only read a certificate file; never below "
                                 "`ORZ_CERT_TTL_S`; raising it makes a leaked certificate worth longer (the gateway "
                                 "still checks access on every connection)", ge=10, le=86400)
    attach_token_ttl_s: int = option("credentials", 120, "lifetime of one-time attach tokens (JWT)", ge=5, le=600)
    permit_port_forwarding: bool = option("credentials", True, "port forwarding (-L, -D, -R) into sessions: "
                                          "certificates carry it and the gateway allows it, for logins with "
                                          "certificates and attach tokens alike (set it the same for the API and "
                                          "the gateway)")
    secrets_key: SecretStr = option("credentials", SecretStr(""), "key(s) encrypting stored secrets: "
                                    "`kid:base64` (or bare base64) entries separated by commas, the first one "
                                    "current (api/credentials/secrets_keys.py; not with `ORZ_SECRETS_KEY_FILE`)")
    secrets_key_file: Path | None = option("credentials", None, "a file holding the `ORZ_SECRETS_KEY` entries; unset "
                                           "(and no `ORZ_SECRETS_KEY`): a key file generated in the data dir's keys")

    # Sign-in (docs/sign-in.md). An OIDC issuer is found by its discovery document; GitHub by its base URL.
    oidc_issuer: str = option("sign-in", "", "the OIDC issuer people sign in with (empty: no OIDC sign-in)")
    oidc_client_id: str = option("sign-in", "", "the API's OAuth client id at the OIDC issuer")
    oidc_client_secret: SecretStr = option("sign-in", SecretStr(""), "the API's OAuth client secret at the OIDC "
                                           "issuer")
    oidc_scopes: str = option("sign-in", "openid email profile", "scopes asked of the OIDC issuer")
    oidc_name: str = option("sign-in", "oidc", "the name `orz cloud whoami` and the browser pages' \"Sign in "
                            "with ...\" link show for the OIDC provider (\"Google\", \"Keycloak\", ...)")
    github_client_id: str = option("sign-in", "", "the GitHub OAuth app's client id (empty: no GitHub sign-in)")
    github_client_secret: SecretStr = option("sign-in", SecretStr(""), "the GitHub OAuth app's client secret (for "
                                             "the browser terminal's web flow)")
    github_base_url: str = option("sign-in", "https://github.com", "GitHub, or GitHub Enterprise "
                                  "(https://github.example.com)")
    github_api_url: str = option("sign-in", "", "GitHub's REST API; empty: https://api.github.com, or "
                                 "<base>/api/v3 for GitHub Enterprise", shown="from `ORZ_GITHUB_BASE_URL`")
    signin_allowed_domains: str = option("sign-in", "", "comma-separated: sign-ins must have a verified email in "
                                         "one of these domains (empty: any domain)")
    signin_github_orgs: str = option("sign-in", "", "comma-separated GitHub orgs; a GitHub sign-in must belong to "
                                     "one (empty: any account)")
    signin_github_teams: str = option("sign-in", "", "comma-separated GitHub teams as org/team-slug; a GitHub "
                                      "sign-in must be on one (empty: no team rule)")
    signin_new_users: Literal["create", "pending", "refuse"] = option(
        "sign-in", "pending", "what a first sign-in of an unknown person does: `create` the user (in "
        "`ORZ_SIGNIN_ORG`), leave them `pending` until `orz admin approve EMAIL`, or `refuse` (only users an admin "
        "created get in)")
    signin_org: str = option("sign-in", "default", "the org users created by a sign-in join")
    signin_token_ttl_s: int = option("sign-in", 3600, "lifetime of the API token a sign-in gets", ge=60,
                                     le=30 * 24 * 3600)
    signin_refresh_ttl_s: int = option("sign-in", 30 * 24 * 3600, "lifetime of a sign-in's refresh token", ge=300)
    signin_device_ttl_s: int = option("sign-in", 900, "how long `orz cloud login` may wait for the person to "
                                      "approve in the browser", ge=30, le=3600)
    signin_metadata_ttl_s: int = option("sign-in", 3600, "how long discovery documents and JWKS are kept before "
                                        "asking the provider again", ge=0)
    signin_clock_skew_s: int = option("sign-in", 60, "seconds of clock skew allowed when checking an id_token's "
                                      "exp/iat/nbf", ge=0, le=600)
    signin_rate_limit: int = option("sign-in", 20, "sign-in attempts per client address inside "
                                    "`ORZ_AUTH_FAIL_WINDOW_S` on the routes anyone may call (starting a device or "
                                    "browser sign-in, the Go CLI's exchange, refused polls and refreshes); beyond it "
                                    "they answer 429 with Retry-After; counted in the database, so every API replica "
                                    "shares it", ge=1)
    api_trusted_proxies: str = option("api", "", "comma-separated addresses or CIDRs of the proxies (ingress) in "
                                      "front of the API; only from these is X-Forwarded-For believed, so the sign-in "
                                      "limit counts the client's address, not the proxy's")
    api_connections_per_address: int = option("api", 256, "connections one client address (an IPv6 one by its "
                                              "/64) may hold open to the API's port at once, per API process; one "
                                              "more is answered 429 `too_many_connections` and closed. The "
                                              "addresses of `ORZ_API_TRUSTED_PROXIES` are not capped (list the "
                                              "ingress there), nor for 10 min an address that presented the "
                                              "service token (a gateway). 0: no cap", ge=0)

    # Sessions
    provider: ProviderName = option("sessions", "local", "where sessions run: `local` processes, `kubernetes` "
                                    "pods, or `fake` (tests)")
    idle_timeout_s: int | None = option("sessions", None, "stop sessions idle this long (an org's own setting "
                                        "comes first); unset: `ORZ_PLAN_IDLE_TIMEOUT_S`", ge=10)
    heartbeat_interval_s: int = option("sessions", 20, "how often runners send a heartbeat", ge=1)
    runner_events_per_min: int = option("sessions", 20, "session events a runner may add a minute (program "
                                        "exits, agent-state changes, a failed push of its work; counted in the "
                                        "database, so across API replicas): the rest are left out, with one note "
                                        "saying so; 0: no limit", ge=0)
    needs_input_after_s: float = option("sessions", 60.0, "a program that printed nothing this long while "
                                        "waiting on its terminal is `needs_input` (for programs that report "
                                        "nothing themselves)", gt=0)
    work_scan_s: float = option("sessions", 15.0, "how often runners read the workspace's git state (dirty "
                                "files, unpushed commits) for heartbeats", gt=0)
    delete_work_wait_s: float = option("sessions", 20.0, "a delete without force stops a live session first "
                                       "and waits this long after the stop for its runner's final report of "
                                       "the workspace; none in time refuses the delete (409 `work_unknown`)",
                                       gt=0, le=120)
    recording_max_bytes: int = option("sessions", 8 * 1024 * 1024, "sessions record their agent's pane (unless "
                                      "their org turned it off, `orz admin set-recording ORG off`): each part of a "
                                      "recording at most this many bytes, the previous part kept beside it, both "
                                      "in the database while the session exists (the API refuses uploads past it); "
                                      "recordings may hold secrets the agent printed (docs/security.md#recordings)",
                                      ge=RECORDING_MIN_BYTES)
    start_timeout_s: int = option("sessions", 600, "a session not running this long after starting fails; the "
                                  "gateway waits as long for a waking session", ge=5)

    # Scheduler
    run_scheduler: bool = option("scheduler", True, "`orz server` runs the scheduler's jobs (reaper, "
                                 "reconciler, purge) in its own process")
    reap_interval_s: int = option("scheduler", 60, "how often the reaper looks for idle, silent and expired "
                                  "sessions", ge=1)
    heartbeat_fail_s: int = option("scheduler", 600, "a session silent this long (no heartbeat) is failed and its "
                                   "compute released; unhealthy comes first", ge=10)
    retention_s: int = option("scheduler", 7 * 24 * 3600, "stopped and failed sessions' workspaces are deleted "
                              "after this long (an org's own setting comes first)", ge=60)
    scheduler_lease_s: int = option("scheduler", 10, "the leader lease: one scheduler replica leads, another "
                                    "takes over this long after it stops renewing", ge=2)
    scheduler_metrics_port: int = option("scheduler", 0, "`orz scheduler` serves /metrics on `ORZ_API_HOST` at this "
                                         "port (0: off; the embedded server shows the scheduler's metrics on the "
                                         "API's metrics port instead)", ge=0, le=65535)

    # Plans
    quota_free: int = option("plans", 2, "active sessions on the free plan", ge=0)
    quota_pro: int = option("plans", 5, "active sessions on the pro plan", ge=0)
    quota_team: int = option("plans", 20, "active sessions on the team plan", ge=0)
    plan_idle_timeout_s: int = option("plans", 30 * 60, "the plans' idle timeout (when `ORZ_IDLE_TIMEOUT_S` is unset)",
                                      ge=10)
    services_free: int = option("plans", DEFAULT_MAX_SERVICES, "`services:` of .orz/cloud.yaml one session of the "
                                f"free plan may run (at most {SERVICES_CEILING}; fixed when the session is "
                                "created)", ge=0, le=SERVICES_CEILING)
    services_pro: int = option("plans", 10, "`services:` per session on the pro plan", ge=0, le=SERVICES_CEILING)
    services_team: int = option("plans", SERVICES_CEILING, "`services:` per session on the team plan", ge=0,
                                le=SERVICES_CEILING)

    # Repository URLs
    repo_allow_hosts: str = option("repositories", "", "comma-separated hosts or CIDRs a repository URL may name "
                                   "although they are loopback, link-local or private")
    repo_file_dirs: str = option("repositories", "", "comma-separated directories `file://` repositories may come "
                                 "from (never the data dir)")

    # Webhooks (api/webhooks, docs/webhooks.md)
    webhook_allow_hosts: str = option("webhooks", "", "comma-separated hosts or CIDRs a webhook may reach although "
                                      "they are loopback, link-local or private, and over plain http (every other "
                                      "URL must be https; docs/webhooks.md)")
    # Network errors, 5xx and 429 are retried; other answers end the delivery.
    webhook_max_attempts: int = option("webhooks", 8, "attempts per delivery before it is given up", ge=1, le=20)
    webhook_retry_base_s: float = option("webhooks", 5.0, "backoff between attempts: `base * 2^(n-1)` with jitter, "
                                         "at most `ORZ_WEBHOOK_RETRY_MAX_S`", gt=0)
    webhook_retry_max_s: float = option("webhooks", 900.0, "the longest backoff between attempts", gt=0)
    webhook_timeout_s: float = option("webhooks", 10.0, "time-out of one delivery attempt", gt=0, le=60)
    webhook_poll_s: float = option("webhooks", 2.0, "how often each scheduler replica looks for deliveries that "
                                   "are due", gt=0)
    webhook_test_limit: int = option("webhooks", 10, "`POST /v1/webhooks/{id}/test` requests (each one outbound POST "
                                     "made at once) a user may make per `ORZ_AUTH_FAIL_WINDOW_S` (60 s), all their "
                                     "webhooks together; beyond it 429 with Retry-After", ge=1, le=1000)

    # Local provider sandbox (bubblewrap)
    sandbox: Literal["on", "off"] = option("sandbox", "on", "local provider: each session in a bubblewrap sandbox "
                                           "(docs/security.md); `off` runs runners as plain processes, for one "
                                           "developer only (refused when more than one org exists)")
    sandbox_uid_base: int = option("sandbox", 200000, "when the server runs as root each session gets its own "
                                   "uid from [base, base + count)", ge=1000)
    sandbox_uid_count: int = option("sandbox", 10000, "how many per-session uids there are", ge=1)
    sandbox_uid_claims_dir: Path = option("sandbox", Path("/var/lib/orz/sandbox-uids"), "where every `orz "
                                          "server` on this machine claims its sessions' uids (one file a uid, "
                                          "under a lock): two servers with their own data dirs never hand out "
                                          "the same uid")
    sandbox_allow_host_ports: str = option("sandbox", "", "comma-separated host loopback ports a session may "
                                           "reach (relayed into its network namespace)")
    sandbox_relay_max_connections: int = option("sandbox", 64, "connections one session may hold at once "
                                                "through the ports relayed into it (the API's and "
                                                "ORZ_SANDBOX_ALLOW_HOST_PORTS, together); more are closed at once, "
                                                "so that one session cannot use up the server's file descriptors "
                                                "(the runner's heartbeats have 4 more of their own)",
                                                ge=1)
    sandbox_pids_max: int = option("sandbox", 2048, "processes per session (cgroup v1 pids controller; needs "
                                   "root)", ge=16)
    sandbox_pids_total: int = option("sandbox", 0, "processes (threads count) of all sessions together: a cgroup "
                                     "v1 pids parent of every session's own (needs root), so that sessions that fork "
                                     "without end leave the server, PostgreSQL and the host some; 0: the host's "
                                     "limit (the lowest of `kernel.pid_max`, `kernel.threads-max` and the server's "
                                     "own cgroup's `pids.max`) less an eighth, at least 4096, at most half",
                                     shown="host's limit less a reserve", ge=0)
    sandbox_memory_total: str = option("sandbox", "", "memory of all sessions together, e.g. `20Gi`: a cgroup v1 "
                                       "memory parent of every session's own (needs root), so that when sessions "
                                       "together use it up the OOM killer picks a session's process, not the "
                                       "server or PostgreSQL; empty: the host's RAM (or the server's own cgroup's "
                                       "limit, if lower) less an eighth, at least 2Gi, at most half",
                                       shown="host's RAM less a reserve")
    sandbox_cgroup_parent: str = option("sandbox", "orz-sessions", "the name of the cgroup (one per controller, "
                                        "in the server's own cgroup, which stays outside it) holding every session's; "
                                        "`orz server`s in the same cgroup with the same name share it and its "
                                        "totals, servers in different cgroups have one each: set their totals so "
                                        "that together they leave the host its reserve",
                                        pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
    sandbox_disk_size: str = option("sandbox", "", "each session's own filesystem, e.g. `10Gi`: a sparse ext4 image "
                                    "mounted at its directory (needs root, mkfs.ext4 and loop devices), so that a "
                                    "session that fills its disk gets \"No space left on device\" while the data "
                                    "dir and other sessions go on; empty: sessions share the data dir's filesystem")
    sandbox_egress_allow: str = option("sandbox", "", "comma-separated hosts or CIDRs sessions may reach although "
                                       "they are private, link-local or this machine's own addresses (the "
                                       "repository allow-list's are included); every other such address is "
                                       "refused inside the session")

    # Kubernetes provider
    k8s_namespace: str = option("kubernetes", "orz-sessions", "the namespace session pods run in")
    k8s_runner_image: str = option("kubernetes", "ghcr.io/orzbob/orzbob-cloud-runner:latest", "the runner's "
                                   "container image")
    k8s_storage_class: str = option("kubernetes", "", "storage class of the workspace volumes (empty: the "
                                    "cluster's default)")
    k8s_workspace_size: str = option("kubernetes", "10Gi", "size of each session's workspace volume")
    k8s_service_image_registries: str = option(
        "kubernetes", "docker.io,ghcr.io,quay.io,public.ecr.aws,registry.k8s.io,mcr.microsoft.com",
        "comma-separated registries (host, or host:port) the images of `services:` in .orz/cloud.yaml may come "
        "from; `*` any. The kubelet pulls them with the node's credentials, which on a managed cluster read the "
        "operator's private registries (ECR, Artifact Registry, ACR), and from the node's network, where an "
        "internal registry answers: list such a registry only if every user may run its images")
    k8s_service_image_pull_policy: Literal["Always", "IfNotPresent"] = option(
        "kubernetes", "Always", "imagePullPolicy of the `services:` containers. `Always` makes the kubelet ask the "
        "registry, with this session's (no) credentials, every time: with `IfNotPresent` a session could run a "
        "private image another tenant (or the operator) pulled onto the node with credentials it lacks; the "
        "price: while a registry is down, sessions with `services:` do not start, cached image or not (mirror "
        "the images into a registry you run). Enable the AlwaysPullImages admission plugin too where you can "
        "(docs/security.md)")
    k8s_gateway_selector: str = option("kubernetes", "app.kubernetes.io/component=gateway", "labels of the "
                                       "gateway's pods, the only pods a session's NetworkPolicy lets reach its runner")
    k8s_gateway_namespace_selector: str = option("kubernetes", "kubernetes.io/metadata.name=orz-system", "labels "
                                                 "of the control-plane namespace the gateway runs in "
                                                 "(NetworkPolicy namespaceSelector)")

    # Runner (read inside a session; the provider sets these).
    runner_spec: str = option("runner", "", "what the runner runs: schemas.RunnerSpec as JSON")
    runner_token: SecretStr = option("runner", SecretStr(""), "the token the runner presents to the API")
    runner_advertise_host: str = option("runner", "", "the address the runner reports for its SSH endpoint when "
                                        "the spec names none (a pod's IP)")
    # Set where the API runs: its providers pass it on to each runner they start (the environment, not
    # the RunnerSpec, whose unknown fields older runner images refuse; they ignore an unknown variable).
    runner_fast_path: bool = option("runner", True, "a pty session's keystrokes and output skip asyncssh's "
                                    "per-packet channel machinery in the runner (`gateway/splice.py`, as "
                                    "`gateway_fast_path` in the gateway); `false` runs them through asyncssh, "
                                    "as a fallback. Set on the API server: runners started after get it")

    # Logging
    log_level: str = option("logging", "INFO", "the lowest level logged (DEBUG, INFO, WARNING, ERROR)")
    log_json: bool = option("logging", True, "log JSON lines (`false`: plain text)")

    @field_validator("gateway_web_trusted_proxies", "api_trusted_proxies")
    @classmethod
    def _proxies_are_networks(cls, value: str) -> str:
        for entry in _split_list(value):
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"not an IP address or CIDR: {entry!r}") from None
        return value

    def web_trusted_proxies(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        entries = _split_list(self.gateway_web_trusted_proxies)
        return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)

    def service_image_registries(self) -> tuple[str, ...]:
        return tuple(entry.lower() for entry in _split_list(self.k8s_service_image_registries))

    def api_proxies(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(entry, strict=False) for entry in _split_list(self.api_trusted_proxies))

    @field_validator("sandbox_allow_host_ports")
    @classmethod
    def _ports_are_ports(cls, value: str) -> str:
        for entry in _split_list(value):
            if not entry.isdigit() or not 0 < int(entry) < 65536:
                raise ValueError(f"not a TCP port: {entry!r}")
        return value

    @field_validator("sandbox_disk_size", "sandbox_memory_total")
    @classmethod
    def _size_is_a_quantity(cls, value: str, info: ValidationInfo) -> str:
        least = 32 if info.field_name == "sandbox_disk_size" else 64  # MiB
        if value and (quantity_bytes(value) or 0) < least * 2**20:
            raise ValueError(f"not a size of {least}Mi or more (like 10Gi): {value!r}")
        return value

    def sandbox_host_ports(self) -> tuple[int, ...]:
        return tuple(int(entry) for entry in _split_list(self.sandbox_allow_host_ports))

    @field_validator("repo_allow_hosts", "webhook_allow_hosts", "sandbox_egress_allow")
    @classmethod
    def _hosts_are_names_or_networks(cls, value: str) -> str:
        for entry in _split_list(value):
            if not entry.replace(".", "").replace("-", "").replace(":", "").replace("/", "").isalnum():
                raise ValueError(f"not a host name, address or CIDR: {entry!r}")
        return value

    def repo_allowed_hosts(self) -> tuple[str, ...]:
        return tuple(entry.lower() for entry in _split_list(self.repo_allow_hosts))

    def webhook_allowed_hosts(self) -> tuple[str, ...]:
        return tuple(entry.lower() for entry in _split_list(self.webhook_allow_hosts))

    def sandbox_egress_allowed(self) -> tuple[str, ...]:
        """What sessions may reach of the non-public addresses: this list and the repositories' allow-list."""
        return tuple(dict.fromkeys(entry.lower() for entry in (*_split_list(self.sandbox_egress_allow),
                                                                *_split_list(self.repo_allow_hosts))))

    def repo_allowed_file_dirs(self) -> tuple[Path, ...]:
        return tuple(Path(entry).resolve() for entry in _split_list(self.repo_file_dirs))

    @field_validator("secrets_key_file", "ssh_ca_public_key_file", "jwt_public_key_file", mode="before")
    @classmethod
    def _empty_path_is_unset(cls, value: object) -> object:
        # ORZ_..._FILE="" (a blank Helm value) means "not set", not the current directory.
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _fill_derived(self) -> Settings:
        # Settings is frozen, so derived defaults go through object.__setattr__ once, here.
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite+aiosqlite:///{self.data_dir / 'orz.db'}")
        if not self.public_api_url:
            wildcard = self.api_host in ("0.0.0.0", "::")  # noqa: S104  # nosec B104  # compared, not bound
            host = "127.0.0.1" if wildcard else self.api_host
            object.__setattr__(self, "public_api_url", f"http://{host}:{self.api_port}")
        if not self.internal_api_url:
            object.__setattr__(self, "internal_api_url", self.public_api_url)
        if not self.github_api_url:
            base = self.github_base_url.rstrip("/")
            api = "https://api.github.com" if base == "https://github.com" else f"{base}/api/v3"
            object.__setattr__(self, "github_api_url", api)
        if not self.public_ssh_host:
            object.__setattr__(self, "public_ssh_host", self.ssh_host)
        if not self.public_ssh_port:
            object.__setattr__(self, "public_ssh_port", self.ssh_port)
        return self

    def web_base_url(self) -> str:
        """The web door's address as a browser sees it (https://..., never ws://)."""
        if self.public_web_url:
            return self.public_web_url.replace("wss://", "https://").replace("ws://", "http://").rstrip("/")
        wildcard = self.gateway_web_host in ("0.0.0.0", "::")  # noqa: S104  # nosec B104  # compared, not bound
        return f"http://{'127.0.0.1' if wildcard else self.gateway_web_host}:{self.gateway_web_port}"

    def signin_callback_url(self) -> str:
        """Where the browser terminal's sign-in returns (the only redirect URI the API lets it use)."""
        return f"{self.web_base_url()}/s/callback"

    def signin_providers(self) -> dict[str, str]:
        """The configured identity providers: the name the sign-in routes take (``provider=``) -> the name
        people see. The API (api/signin) and the gateway's pages (its "Sign in with ..." links) both go by it."""
        found: dict[str, str] = {}
        if self.oidc_issuer and self.oidc_client_id:
            found["oidc"] = "OIDC" if self.oidc_name == "oidc" else self.oidc_name
        if self.github_client_id:
            found["github"] = "GitHub"
        return found

    def signin_domains(self) -> tuple[str, ...]:
        return tuple(d.lower().lstrip("@") for d in _split_list(self.signin_allowed_domains))

    def signin_orgs(self) -> tuple[str, ...]:
        return tuple(o.lower() for o in _split_list(self.signin_github_orgs))

    def signin_teams(self) -> tuple[str, ...]:
        return tuple(t.lower() for t in _split_list(self.signin_github_teams))

    @property
    def longest_cert_ttl_s(self) -> int:
        """How long a certificate may live: what users may ask for, and what the gateway accepts."""
        return max(self.cert_ttl_s, self.cert_max_ttl_s)

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def sessions_dir(self) -> Path:
        return self.data_dir / "sessions"

    def quota_for(self, plan: str) -> int:
        return {"free": self.quota_free, "pro": self.quota_pro, "team": self.quota_team}.get(plan, 0)

    def services_for(self, plan: str) -> int:
        """How many services one session of this plan may run (an unknown plan: the free plan's)."""
        return {"pro": self.services_pro, "team": self.services_team}.get(plan, self.services_free)


# The SSH algorithms the gateway and the runner negotiate, best first (issue 17). Key exchange: only
# curve25519 and its post-quantum hybrids (no finite-field DH groups, no group exchange: their cost per
# handshake made a DoS cheap). Ciphers: AEAD only (DESIGN.md 4). No SHA-1 anywhere. With AEAD ciphers no
# MAC is used, but the MAC list is still sent, so it holds only SHA-2 encrypt-then-MAC. Entries this
# asyncssh cannot do (sntrup761 needs liboqs) are left out when offered (ssh_algorithms()).
SSH_KEX_ALGS = ("mlkem768x25519-sha256", "sntrup761x25519-sha512", "sntrup761x25519-sha512@openssh.com",
                "curve25519-sha256", "curve25519-sha256@libssh.org")
# ChaCha20 is left out: clients pick by their own order (OpenSSH lists ChaCha20 first), and it would cost
# ~9x per packet and the gateway's fast path (gateway/splice.py, AES-GCM only).
SSH_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
SSH_MACS = ("hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com")
# Host key and user-auth signatures: Ed25519, ECDSA and RSA with SHA-2 only (never ssh-rsa, i.e. SHA-1).
SSH_SIGNATURE_ALGS = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
                      "rsa-sha2-512", "rsa-sha2-256", "sk-ssh-ed25519@openssh.com",
                      "sk-ecdsa-sha2-nistp256@openssh.com")


def ssh_algorithms() -> dict[str, list[str]]:
    """asyncssh connection options for the policy above, minus what the installed asyncssh lacks."""
    import asyncssh  # here, not at module level: the API imports this module and needs no SSH stack

    def usable(wanted: tuple[str, ...], known: list[bytes]) -> list[str]:
        have = {alg.decode() for alg in known}
        return [alg for alg in wanted if alg in have]

    return {
        "kex_algs": usable(SSH_KEX_ALGS, asyncssh.kex.get_kex_algs()),
        "encryption_algs": usable(SSH_CIPHERS, asyncssh.encryption.get_encryption_algs()),
        "mac_algs": usable(SSH_MACS, asyncssh.mac.get_mac_algs()),
        # Certificates are signed with these too: an ssh-rsa (SHA-1) signed certificate is refused.
        "signature_algs": usable(SSH_SIGNATURE_ALGS, asyncssh.public_key.get_public_key_algs()),
    }


# ---------------------------------------------------------------- the configuration table (README.md)

TABLE_START = "<!-- settings table: `python -m api.settings --write-readme` writes it from api/settings.py -->"
TABLE_END = "<!-- end of settings table -->"


def _shown_default(name: str, field: FieldInfo) -> str:
    """A field's default as the table shows it (durations also in minutes, hours or days); a secret's never."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    shown = extra.get("shown_default")
    if isinstance(shown, str):
        return shown
    value = field.get_default(call_default_factory=True)
    if isinstance(value, SecretStr):
        return "empty (secret)" if not value.get_secret_value() else "(secret)"
    if value is None:
        return "unset"
    if value == "":
        return "empty"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int | float):
        number = f"{value:g}" if isinstance(value, float) else str(value)  # 240.0 as 240, 2592000 in full
        return f"`{number}`" + (_duration(value) if name.endswith("_s") else "")
    return f"`{value}`"


def _duration(seconds: int | float) -> str:
    """ " (30 min)" for a whole number of minutes, hours or days beyond two minutes; "" otherwise."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= max(size, 120) and seconds % size == 0:
            return f" ({int(seconds // size)} {unit})"
    return ""


def markdown_table(settings_class: type[Settings] = Settings) -> str:
    """Every setting as README's configuration table: one table per component, in GROUPS order."""
    prefix = settings_class.model_config.get("env_prefix", "")
    rows: dict[str, list[str]] = {group: [] for group in GROUPS}
    for name, field in settings_class.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        group = str(extra.get("group"))
        if group not in rows or not field.description:
            raise ValueError(f"setting {name} needs a help text and one of the groups {', '.join(GROUPS)}")
        cells = [f"`{prefix}{name.upper()}`", _shown_default(name, field), field.description]
        rows[group].append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    out: list[str] = []
    for group, title in GROUPS.items():
        if rows[group]:
            out += [f"#### {title}", "", "| variable | default | meaning |", "|---|---|---|", *rows[group], ""]
    return "\n".join(out).rstrip("\n") + "\n"


def readme_with_table(readme: str, table: str) -> str:
    """README's text with the part between TABLE_START and TABLE_END replaced by ``table``."""
    start, end = readme.find(TABLE_START), readme.find(TABLE_END)
    if start < 0 or end < start:
        raise ValueError(f"README has no {TABLE_START!r} ... {TABLE_END!r} block")
    return f"{readme[:start + len(TABLE_START)]}\n\n{table}\n{readme[end:]}"


class SettingsInvalid(ValueError):
    """A setting the services cannot start with, named by its environment variable."""


def load_settings(**overrides: object) -> Settings:
    """Read the environment, with explicit overrides (command-line flags) on top. A bad value is a
    SettingsInvalid naming ``ORZ_<NAME>`` and why, never the value pydantic would echo (it may be a secret)."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        prefix = Settings.model_config.get("env_prefix", "")
        problems = []
        for error in exc.errors(include_input=False, include_url=False):
            name = ".".join(str(part) for part in error["loc"] if not isinstance(part, int))
            message = error_message(error)
            problems.append(f"{prefix}{name.upper()}: {message}" if name else message)
        raise SettingsInvalid("; ".join(problems)) from None


def main(argv: list[str] | None = None) -> int:
    """``--markdown``: print the configuration table; ``--write-readme [PATH]``: put it into README.md."""
    parser = argparse.ArgumentParser(prog="python -m api.settings", description=main.__doc__)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--markdown", action="store_true", help="print the configuration table (Markdown)")
    action.add_argument("--write-readme", nargs="?", const=Path("README.md"), metavar="PATH", type=Path,
                        help="replace the table in README.md (or PATH)")
    args = parser.parse_args(argv)
    path: Path | None = args.write_readme
    try:
        table = markdown_table()
        if path is None:
            sys.stdout.write(table)
            return 0
        text = readme_with_table(path.read_text(encoding="utf-8"), table)
    except (OSError, ValueError) as exc:
        parser.error(f"{path or 'settings'}: {exc}")
    path.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
