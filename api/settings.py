"""The one settings object for every Orzbob Cloud service, read from ``ORZ_*`` environment variables.

It lives beside the API's contract modules (``schemas``, ``client``) and, like them, imports nothing
heavy, so the gateway, the runner and the CLI read their configuration from the same place.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from api.cloud_yaml import DEFAULT_MAX_SERVICES, SERVICES_CEILING
from api.schemas import RECORDING_MIN_BYTES

ProviderName = Literal["local", "kubernetes", "fake"]


def _split_list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "orzbob"


class Settings(BaseSettings):
    """Deployment configuration. Frozen: build a new one (``model_copy(update=...)``) to change it."""

    model_config = SettingsConfigDict(env_prefix="ORZ_", frozen=True, extra="ignore")

    # Where the embedded default keeps its database, keys and session workspaces.
    data_dir: Path = Field(default_factory=default_data_dir)
    database_url: str = ""
    # Fail fast instead of serving from a schema the code does not match.
    require_schema_head: bool = True
    # How long `orz api` and `orz scheduler` wait (not ready, logging why) for the database schema to
    # reach this code's head (or a compatible newer one) before giving up; 0 refuses at once.
    schema_wait_s: int = Field(default=300, ge=0)
    # How long `orz admin migrate` waits for the database to answer.
    db_wait_s: int = Field(default=120, ge=0)

    # API
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8080, ge=0, le=65535)
    # `orz api` and `orz server` serve /metrics on api_host at this port, never on api_port (0: off;
    # the chart sets 9101). The embedded server's listener shows its scheduler and gateway too.
    api_metrics_port: int = Field(default=0, ge=0, le=65535)
    # How users' CLIs reach the API; derived from host/port when empty.
    public_api_url: str = ""
    # How the gateway (authorize, attach events, the web door's token requests) and runners (heartbeats,
    # log upload) reach the API: an in-cluster address, so /internal never crosses the public edge.
    # Empty: public_api_url (the embedded default, where both are the same loopback address).
    internal_api_url: str = ""
    max_request_bytes: int = Field(default=256 * 1024, gt=0)
    # How long a verified API token is trusted without asking the database again (0 disables).
    auth_cache_ttl_s: float = Field(default=1.0, ge=0, le=60)

    # Gateway
    ssh_host: str = "127.0.0.1"
    ssh_port: int = Field(default=2222, ge=0, le=65535)
    # The host name users type after the @; defaults to ssh_host.
    public_ssh_host: str = ""
    # The port users connect to; defaults to ssh_port (it differs behind a load balancer).
    public_ssh_port: int = Field(default=0, ge=0, le=65535)
    gateway_web_host: str = "127.0.0.1"
    gateway_web_port: int = Field(default=8443, ge=0, le=65535)
    public_web_url: str = ""
    # Comma-separated addresses/CIDRs of the TLS proxies in front of the web door. Only from these is
    # X-Forwarded-For believed, so rate limits and logs see the browser's address, not the proxy's.
    gateway_web_trusted_proxies: str = ""
    gateway_metrics_port: int = Field(default=0, ge=0, le=65535)
    gateway_host_key_file: Path | None = None
    # The gateway's client key for its connections to runners; runners trust only its public half.
    gateway_client_key_file: Path | None = None
    gateway_public_key: str = ""
    # Relay session bytes between client and runner without asyncssh's per-packet channel machinery
    # (gateway/splice.py); off runs every packet through asyncssh, as a fallback and for comparison.
    gateway_fast_path: bool = True
    # How often each gateway asks the API which live attachments must end (user disabled, session
    # deleted, access revoked): one request per gateway per interval (gateway/revocation.py).
    gateway_access_check_s: float = Field(default=1.0, ge=0.1, le=60)
    # Connections still in the handshake or authenticating, per source address and in all (beyond these,
    # new TCP connections are refused at once: key exchanges cost CPU before anyone has authenticated).
    gateway_preauth_per_source: int = Field(default=10, ge=1)
    gateway_preauth_total: int = Field(default=256, ge=1)
    # A connection that has not authenticated within this many seconds is closed.
    gateway_login_timeout_s: int = Field(default=20, ge=1, le=120)
    # On SIGTERM `orz gateway` stops taking connections and tells attached users it is restarting; the
    # connections it has keep running this many seconds at most, then end with a clean SSH disconnect.
    # Keep it below the pod's terminationGracePeriodSeconds (the chart derives one from the other).
    gateway_drain_s: float = Field(default=240.0, ge=0, le=3600)
    # Failed authentications allowed per source address inside auth_fail_window_s.
    auth_fail_limit: int = Field(default=10, ge=1)
    auth_fail_window_s: int = Field(default=60, ge=1)
    # Service token the gateway presents to the API's internal routes.
    service_token: SecretStr = SecretStr("")

    # Credentials
    ssh_ca_key_file: Path | None = None
    jwt_key_file: Path | None = None
    # The gateway's trust anchors: the public halves of the two keys above (an OpenSSH line, a PEM public
    # key or a PEM certificate). Unset: the .pub file beside the private key path (the embedded default).
    ssh_ca_public_key_file: Path | None = None
    jwt_public_key_file: Path | None = None
    cert_ttl_s: int = Field(default=300, ge=10, le=3600)
    # The longest certificate a user may ask for (`orz cloud cert --ttl`, AttachRequest.ttl_s), for
    # automation that can only read a certificate file; never below cert_ttl_s. Raising it makes a leaked
    # certificate worth longer (the gateway still checks access on every connection). API and gateway.
    cert_max_ttl_s: int = Field(default=300, ge=10, le=86400)
    attach_token_ttl_s: int = Field(default=120, ge=5, le=600)
    permit_port_forwarding: bool = True
    secrets_key: SecretStr = SecretStr("")
    secrets_key_file: Path | None = None

    # Sign-in (docs/sign-in.md): identity providers, the rules that map an identity to a user, and the
    # tokens a sign-in gets. An OIDC issuer is found by its discovery document; GitHub by its base URL
    # (GitHub Enterprise: https://github.example.com; its REST API is then <base>/api/v3).
    oidc_issuer: str = ""
    oidc_client_id: str = ""
    oidc_client_secret: SecretStr = SecretStr("")
    oidc_scopes: str = "openid email profile"
    # The name `orz cloud whoami` shows for the OIDC provider ("Google", "Keycloak", ...).
    oidc_name: str = "oidc"
    github_client_id: str = ""
    github_client_secret: SecretStr = SecretStr("")
    github_base_url: str = "https://github.com"
    github_api_url: str = ""  # derived from github_base_url when empty
    # Comma-separated: sign-ins must have a verified email in one of these domains (empty: any domain).
    signin_allowed_domains: str = ""
    # Comma-separated GitHub orgs; a GitHub sign-in must belong to one (empty: any account).
    signin_github_orgs: str = ""
    # Comma-separated GitHub teams as org/team-slug; a GitHub sign-in must be on one (empty: no team rule).
    signin_github_teams: str = ""
    # What a first sign-in of an unknown person does: "create" the user (in signin_org), leave them
    # "pending" until `orz admin approve EMAIL`, or "refuse" (only users an admin created get in).
    signin_new_users: Literal["create", "pending", "refuse"] = "pending"
    signin_org: str = "default"
    signin_token_ttl_s: int = Field(default=3600, ge=60, le=30 * 24 * 3600)
    signin_refresh_ttl_s: int = Field(default=30 * 24 * 3600, ge=300)
    # Bound on how long a `orz cloud login` may wait for the person to approve in the browser.
    signin_device_ttl_s: int = Field(default=900, ge=30, le=3600)
    # How long discovery documents and JWKS are kept before asking the provider again.
    signin_metadata_ttl_s: int = Field(default=3600, ge=0)
    # Seconds of clock skew allowed when checking an id_token's exp/iat/nbf.
    signin_clock_skew_s: int = Field(default=60, ge=0, le=600)
    # Sign-in attempts per client address inside auth_fail_window_s on the routes anyone may call
    # (starting a device or browser sign-in, the Go CLI's exchange, refused polls and refreshes); beyond
    # it they answer 429 with Retry-After. Counted in the database, so every API replica shares it.
    signin_rate_limit: int = Field(default=20, ge=1)
    # Comma-separated addresses/CIDRs of the proxies (ingress) in front of the API: only from these is
    # X-Forwarded-For believed, so the sign-in limit counts the client's address, not the proxy's.
    api_trusted_proxies: str = ""

    # Lifecycle
    provider: ProviderName = "local"
    idle_timeout_s: int | None = Field(default=None, ge=10)
    reap_interval_s: int = Field(default=60, ge=1)
    heartbeat_interval_s: int = Field(default=20, ge=1)
    # The runner's needs_input detector: no pane output this long while the foreground process waits
    # on the terminal (for programs that report nothing themselves).
    needs_input_after_s: float = Field(default=60.0, gt=0)
    # How often runners read the workspace's git state (dirty files, unpushed commits) for heartbeats.
    work_scan_s: float = Field(default=15.0, gt=0)
    # Sessions record their agent's pane (unless their org turned it off): each part of a recording at
    # most this many bytes, the previous part kept beside it (docs/security.md#recordings).
    recording_max_bytes: int = Field(default=8 * 1024 * 1024, ge=RECORDING_MIN_BYTES)
    # A session silent this long (no heartbeat) is failed and its compute released; unhealthy comes first.
    heartbeat_fail_s: int = Field(default=600, ge=10)
    retention_s: int = Field(default=7 * 24 * 3600, ge=60)
    start_timeout_s: int = Field(default=600, ge=5)
    scheduler_lease_s: int = Field(default=10, ge=2)
    # `orz scheduler` serves /metrics on api_host at this port (0: off; the embedded server shows the
    # scheduler's metrics on the API's metrics port instead).
    scheduler_metrics_port: int = Field(default=0, ge=0, le=65535)
    run_scheduler: bool = True

    # Plans: how many active sessions each plan allows.
    quota_free: int = Field(default=2, ge=0)
    quota_pro: int = Field(default=5, ge=0)
    quota_team: int = Field(default=20, ge=0)
    plan_idle_timeout_s: int = Field(default=30 * 60, ge=10)
    # Plans: how many `services:` of .orz/cloud.yaml one session may run (at most SERVICES_CEILING).
    services_free: int = Field(default=DEFAULT_MAX_SERVICES, ge=0, le=SERVICES_CEILING)
    services_pro: int = Field(default=10, ge=0, le=SERVICES_CEILING)
    services_team: int = Field(default=SERVICES_CEILING, ge=0, le=SERVICES_CEILING)

    # Runner (read inside a session; the provider sets these). The spec is schemas.RunnerSpec as JSON.
    runner_spec: str = ""
    runner_token: SecretStr = SecretStr("")
    # Address the runner reports for its SSH endpoint when the spec names none (a pod's IP).
    runner_advertise_host: str = ""

    # Local provider sandbox (bubblewrap): "off" runs runners as plain processes, for one developer only
    # (refused when more than one org exists).
    sandbox: Literal["on", "off"] = "on"
    # When the server runs as root each session gets its own uid from [base, base + count).
    sandbox_uid_base: int = Field(default=200000, ge=1000)
    sandbox_uid_count: int = Field(default=10000, ge=1)
    # Comma-separated host loopback ports a session may reach (relayed into its network namespace).
    sandbox_allow_host_ports: str = ""
    # Processes per session (cgroup v1 pids controller; needs root).
    sandbox_pids_max: int = Field(default=2048, ge=16)

    # Repository URLs: hosts or CIDRs that may be loopback/link-local/private and still be cloned,
    # and the directories file:// repositories may come from (never the data dir). Comma-separated.
    repo_allow_hosts: str = ""
    repo_file_dirs: str = ""

    # Webhooks (api/webhooks, docs/webhooks.md). Hosts or CIDRs a webhook may reach although they are
    # loopback/link-local/private, and over plain http (every other URL must be https). Comma-separated.
    webhook_allow_hosts: str = ""
    # Attempts per delivery before it is given up, and the backoff between them: base * 2^(n-1) with
    # jitter, at most max. Network errors, 5xx and 429 are retried; other answers end the delivery.
    webhook_max_attempts: int = Field(default=8, ge=1, le=20)
    webhook_retry_base_s: float = Field(default=5.0, gt=0)
    webhook_retry_max_s: float = Field(default=900.0, gt=0)
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=60)
    # How often each scheduler replica looks for deliveries that are due.
    webhook_poll_s: float = Field(default=2.0, gt=0)

    # Kubernetes provider
    k8s_namespace: str = "orz-sessions"
    k8s_runner_image: str = "ghcr.io/orzbob/orzbob-cloud-runner:latest"
    k8s_storage_class: str = ""
    k8s_workspace_size: str = "10Gi"
    k8s_gateway_selector: str = "app.kubernetes.io/component=gateway"
    # Labels of the control-plane namespace the gateway runs in (NetworkPolicy namespaceSelector).
    k8s_gateway_namespace_selector: str = "kubernetes.io/metadata.name=orz-system"

    # Logging
    log_level: str = "INFO"
    log_json: bool = True

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

    def api_proxies(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(entry, strict=False) for entry in _split_list(self.api_trusted_proxies))

    @field_validator("sandbox_allow_host_ports")
    @classmethod
    def _ports_are_ports(cls, value: str) -> str:
        for entry in _split_list(value):
            if not entry.isdigit() or not 0 < int(entry) < 65536:
                raise ValueError(f"not a TCP port: {entry!r}")
        return value

    def sandbox_host_ports(self) -> tuple[int, ...]:
        return tuple(int(entry) for entry in _split_list(self.sandbox_allow_host_ports))

    @field_validator("repo_allow_hosts", "webhook_allow_hosts")
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


def load_settings(**overrides: object) -> Settings:
    """Read the environment, with explicit overrides (command-line flags) on top."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
