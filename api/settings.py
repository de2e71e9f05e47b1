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

PlanName = Literal["free", "pro", "team"]
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

    # API
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8080, ge=0, le=65535)
    # How clients and runners reach the API; derived from host/port when empty.
    public_api_url: str = ""
    max_request_bytes: int = Field(default=256 * 1024, gt=0)
    # How long a verified API token is trusted without asking the database again (0 disables).
    auth_cache_ttl_s: float = Field(default=5.0, ge=0, le=60)

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
    # Failed authentications allowed per source address inside auth_fail_window_s.
    auth_fail_limit: int = Field(default=10, ge=1)
    auth_fail_window_s: int = Field(default=60, ge=1)
    # Service token the gateway presents to the API's internal routes.
    service_token: SecretStr = SecretStr("")

    # Credentials
    ssh_ca_key_file: Path | None = None
    jwt_key_file: Path | None = None
    cert_ttl_s: int = Field(default=300, ge=10, le=3600)
    attach_token_ttl_s: int = Field(default=120, ge=5, le=600)
    permit_port_forwarding: bool = True
    secrets_key: SecretStr = SecretStr("")
    secrets_key_file: Path | None = None

    # Lifecycle
    provider: ProviderName = "local"
    idle_timeout_s: int | None = Field(default=None, ge=10)
    reap_interval_s: int = Field(default=60, ge=1)
    heartbeat_interval_s: int = Field(default=20, ge=1)
    # A session silent this long (no heartbeat) is failed and its compute released; unhealthy comes first.
    heartbeat_fail_s: int = Field(default=600, ge=10)
    retention_s: int = Field(default=7 * 24 * 3600, ge=60)
    start_timeout_s: int = Field(default=600, ge=5)
    scheduler_lease_s: int = Field(default=30, ge=2)
    # `orz scheduler` serves /metrics on api_host at this port (0: off; the embedded server shows the
    # scheduler's metrics on the API's /metrics instead).
    scheduler_metrics_port: int = Field(default=0, ge=0, le=65535)
    run_scheduler: bool = True

    # Plans: how many active sessions each plan allows.
    quota_free: int = Field(default=2, ge=0)
    quota_pro: int = Field(default=5, ge=0)
    quota_team: int = Field(default=20, ge=0)
    plan_idle_timeout_s: int = Field(default=30 * 60, ge=10)

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

    @field_validator("gateway_web_trusted_proxies")
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

    @field_validator("sandbox_allow_host_ports")
    @classmethod
    def _ports_are_ports(cls, value: str) -> str:
        for entry in _split_list(value):
            if not entry.isdigit() or not 0 < int(entry) < 65536:
                raise ValueError(f"not a TCP port: {entry!r}")
        return value

    def sandbox_host_ports(self) -> tuple[int, ...]:
        return tuple(int(entry) for entry in _split_list(self.sandbox_allow_host_ports))

    @field_validator("repo_allow_hosts")
    @classmethod
    def _hosts_are_names_or_networks(cls, value: str) -> str:
        for entry in _split_list(value):
            if not entry.replace(".", "").replace("-", "").replace(":", "").replace("/", "").isalnum():
                raise ValueError(f"not a host name, address or CIDR: {entry!r}")
        return value

    def repo_allowed_hosts(self) -> tuple[str, ...]:
        return tuple(entry.lower() for entry in _split_list(self.repo_allow_hosts))

    def repo_allowed_file_dirs(self) -> tuple[Path, ...]:
        return tuple(Path(entry).resolve() for entry in _split_list(self.repo_file_dirs))

    @field_validator("secrets_key_file", mode="before")
    @classmethod
    def _empty_path_is_unset(cls, value: object) -> object:
        # ORZ_SECRETS_KEY_FILE="" (a blank Helm value) means "not set", not the current directory.
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
        if not self.public_ssh_host:
            object.__setattr__(self, "public_ssh_host", self.ssh_host)
        if not self.public_ssh_port:
            object.__setattr__(self, "public_ssh_port", self.ssh_port)
        return self

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def sessions_dir(self) -> Path:
        return self.data_dir / "sessions"

    def quota_for(self, plan: str) -> int:
        return {"free": self.quota_free, "pro": self.quota_pro, "team": self.quota_team}.get(plan, 0)


def load_settings(**overrides: object) -> Settings:
    """Read the environment, with explicit overrides (command-line flags) on top."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
