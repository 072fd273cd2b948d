"""Configuration: a TOML file with named defaults, overridden by POLICYD_* environment variables.

Every key has a default, so policyd runs with no file at all (SQLite and keys under ./var/).
An environment variable overrides one key: `POLICYD_<SECTION>_<KEY>`, upper-case, nested
sections joined by `_` (e.g. POLICYD_SERVER_ADDRESS, POLICYD_SERVER_TLS_CERT_FILE). The
file is found at --config, else $POLICYD_CONFIG, else ./policyd.toml when it exists.
Unknown keys, wrong types and invalid values are one-line ConfigErrors naming the key.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from policyd.core import cpus, logs, net
from policyd.core.errors import ConfigError
from policyd.core.urls import POSTGRES_SCHEMES, is_postgres, redact
from policyd.store.keys import ALGORITHMS

DEFAULT_FILE = "policyd.toml"


@dataclass
class TLSConfig:
    # Server certificate chain and key (PEM). Both set = TLS.
    cert_file: str = ""
    key_file: str = ""
    # CA bundle for client certificates. Set = mutual TLS (clients must present one).
    client_ca_file: str = ""


@dataclass
class ServerConfig:
    address: str = "127.0.0.1:50051"
    # Processes sharing the port (SO_REUSEPORT); one per core is a good start.
    workers: int = 1
    # Threads per process handling calls.
    threads: int = 16
    # "auto": each serving process runs on one CPU of its own (worker i on the i-th);
    # "none": unpinned; or a CPU list such as "0,2" or "0-3" (policyd/core/cpus.py).
    cpu_affinity: str = "auto"
    # On SIGTERM: stop accepting, let in-flight calls finish for up to this long.
    grace_seconds: float = 10.0
    tls: TLSConfig = field(default_factory=TLSConfig)


@dataclass
class ClientConfig:
    """How the CLI reaches a running server (policyd check)."""

    address: str = ""  # default: server.address
    ca_file: str = ""  # set = TLS
    cert_file: str = ""  # with key_file = mutual TLS
    key_file: str = ""
    timeout_seconds: float = 5.0


@dataclass
class StoreConfig:
    # "" = the SQLite file at `path` (one host); "postgresql://USER@HOST:PORT/DB" = the
    # PostgreSQL store that several replicas share (docs/cluster.md); "sqlite:///PATH" too.
    url: str = ""
    path: str = "var/policyd.db"
    # PostgreSQL: connections each process keeps for decision-time reads.
    pool_size: int = 8
    # PostgreSQL: each serving process holds a lease this long, renewed every quarter of
    # it; a revoking write waits for every live lease's acknowledgement, at most this long
    # for a replica that stopped answering (docs/cluster.md, "Consistency protocol").
    lease_seconds: float = 2.0


@dataclass
class LogConfig:
    # "plain": a line of text per record; "json": one JSON object per line (time, level,
    # logger, message, decision_id where there is one) for a log shipper.
    format: str = "plain"


@dataclass
class MetricsConfig:
    # HOST:PORT of the Prometheus /metrics endpoint (docs/metrics.md); "" = off. Served by
    # the process that owns server.address, summing every worker and the audit indexer.
    address: str = ""


@dataclass
class TracingConfig:
    # OpenTelemetry spans of decisions (docs/tracing.md), sent over OTLP/HTTP; off by default.
    enabled: bool = False
    # The collector's OTLP/HTTP traces URL (protobuf).
    endpoint: str = "http://127.0.0.1:4318/v1/traces"
    # Requests that come without a trace context: the share traced (0 to 1). Those with one
    # are traced when their caller sampled them.
    sample_ratio: float = 1.0
    # Each export's deadline; also the longest a stopping server waits to send what is queued.
    timeout_seconds: float = 5.0


@dataclass
class ClusterConfig:
    # This replica's name in the cluster: its lease rows and its audit chain are filed under
    # it. "" = HOSTNAME:PORT of server.address (unique per replica on one host, too).
    node: str = ""


@dataclass
class TokensConfig:
    issuer: str = "http://127.0.0.1:8080"
    audience: str = "policyd-hub"
    # The audience of connectors' tokens (docs/connectors.md): never the hub's.
    link_audience: str = "policyd-link"
    leeway_seconds: float = 30.0
    max_token_bytes: int = 8192
    ttl_seconds: int = 3600
    key_dir: str = "var/keys"
    algorithm: str = "ES256"
    cache_size: int = 100_000


@dataclass
class EngineConfig:
    max_body_bytes: int = 1 << 20


@dataclass
class PolicyConfig:
    # The folder of policy files (docs/policy.md); serving refuses a missing or invalid one.
    dir: str = "policies"
    # How often `policyd serve` looks for changed policy files (0 = only on SIGHUP).
    watch_seconds: float = 1.0


@dataclass
class AuditConfig:
    enabled: bool = True
    # The audit log's own SQLite file, and the key of its hash chain (mode 0600).
    path: str = "var/audit.db"
    key_file: str = "var/audit.key"
    # "normal": a recorded decision survives a crash or kill -9 of the server;
    # "full": it also survives power loss (the journal is synced before the answer).
    sync: str = "normal"
    # How long the indexer may fall behind before decisions are denied (journal.py).
    timeout_seconds: float = 5.0
    # Retention, applied while serving: records older than this are pruned (0 = keep).
    max_age_days: float = 90.0
    # Prune the oldest records when the file's data exceeds this many bytes (0 = no limit).
    max_bytes: int = 0
    retention_interval_seconds: float = 60.0


@dataclass
class OAuthConfig:
    """The authorization server (docs/oauth.md). Its issuer URL is tokens.issuer."""

    # Started by `policyd serve` on its own HTTP port.
    enabled: bool = True
    address: str = "127.0.0.1:8080"
    # Certificate chain and key (PEM) to serve HTTPS; both empty = plain HTTP (e.g. behind
    # a TLS-terminating proxy, with tokens.issuer an https URL).
    cert_file: str = ""
    key_file: str = ""
    # 32 random bytes keying the CSRF tokens of the pages; made on first use, mode 0600.
    session_key_file: str = "var/oauth-session.key"
    session_ttl_seconds: int = 28800
    code_ttl_seconds: int = 60
    refresh_ttl_seconds: int = 2592000
    # Failed sign-ins allowed per user name, and per client address, within the window.
    login_max_failures: int = 5
    login_window_seconds: float = 300.0
    # Hook for a trusted upstream identity: the header a fronting proxy sets to the signed-in
    # user's id. Set = no local sign-in. Only safe when every request passes that proxy.
    trusted_user_header: str = ""


@dataclass
class EnvoyConfig:
    """The Envoy ext_authz v3 door, served beside the Decision API (docs/envoy.md)."""

    enabled: bool = True
    # Remove the Authorization header before Envoy forwards an allowed request to the hub.
    remove_authorization: bool = False
    # HOST:PORT, or unix:/PATH (a Unix socket, for an Envoy on the same host), of the
    # HTTP/1.1 ext_authz door (Envoy's `http_service` mode, adapters/envoy/envoy-http.yaml),
    # served beside the gRPC door; "" = off.
    http_address: str = ""


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    envoy: EnvoyConfig = field(default_factory=EnvoyConfig)
    oauth: OAuthConfig = field(default_factory=OAuthConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)

    def validate(self) -> None:
        s = self.server
        net.parse("server.address", s.address)
        if self.client.address:
            net.parse("client.address", self.client.address)
        if self.metrics.address:
            net.parse("metrics.address", self.metrics.address)
        unix = net.UNIX_PREFIX
        if self.envoy.http_address.startswith(unix):
            path = self.envoy.http_address[len(unix) :]
            if not path.startswith("/"):
                raise ConfigError(
                    "envoy.http_address: a Unix socket is unix:/ABSOLUTE/PATH,"
                    f" not {self.envoy.http_address!r}"
                )
            if len(path.encode()) > 107:  # sun_path holds 108 bytes
                raise ConfigError(
                    "envoy.http_address: a Unix socket path is at most 107 bytes long"
                )
            if s.workers > 1:
                raise ConfigError(
                    "envoy.http_address: a Unix socket cannot be shared by server.workers"
                    " (use HOST:PORT)"
                )
        elif self.envoy.http_address:
            net.parse("envoy.http_address", self.envoy.http_address)
        _at_least("server.workers", s.workers, 1)
        _at_least("server.threads", s.threads, 1)
        cpus.parse(s.cpu_affinity)
        _at_least("server.grace_seconds", s.grace_seconds, 0)
        if not self.client.timeout_seconds > 0:
            raise ConfigError(
                f"client.timeout_seconds must be above 0, not {self.client.timeout_seconds}"
            )
        if bool(s.tls.cert_file) != bool(s.tls.key_file):
            raise ConfigError("server.tls: set both cert_file and key_file, or neither")
        if s.tls.client_ca_file and not s.tls.cert_file:
            raise ConfigError("server.tls.client_ca_file needs cert_file and key_file")
        for key, path in (
            ("server.tls.cert_file", s.tls.cert_file),
            ("server.tls.key_file", s.tls.key_file),
            ("server.tls.client_ca_file", s.tls.client_ca_file),
            ("client.ca_file", self.client.ca_file),
            ("client.cert_file", self.client.cert_file),
            ("client.key_file", self.client.key_file),
        ):
            if path and not Path(path).is_file():
                raise ConfigError(f"{key}: no such file {path!r}")
        if bool(self.client.cert_file) != bool(self.client.key_file):
            raise ConfigError("client: set both cert_file and key_file, or neither")
        t = self.tokens
        if not t.issuer:
            raise ConfigError("tokens.issuer must not be empty")
        if not t.audience:
            raise ConfigError("tokens.audience must not be empty")
        if not t.link_audience:
            raise ConfigError("tokens.link_audience must not be empty")
        if t.link_audience == t.audience:
            raise ConfigError(
                "tokens.link_audience must differ from tokens.audience: a connector's token"
                " must never pass for an app's"
            )
        if not 0 <= t.leeway_seconds <= 300:
            raise ConfigError("tokens.leeway_seconds must be between 0 and 300")
        _at_least("tokens.max_token_bytes", t.max_token_bytes, 256)
        _at_least("tokens.ttl_seconds", t.ttl_seconds, 1)
        _at_least("tokens.cache_size", t.cache_size, 1)
        if t.algorithm not in ALGORITHMS:
            raise ConfigError(f"tokens.algorithm must be one of {', '.join(ALGORITHMS)}")
        _at_least("engine.max_body_bytes", self.engine.max_body_bytes, 1)
        if not self.policy.dir:
            raise ConfigError("policy.dir must not be empty")
        _at_least("policy.watch_seconds", self.policy.watch_seconds, 0)
        st = self.store
        if st.url and not st.url.startswith(STORE_SCHEMES):
            raise ConfigError(
                f"store.url must start with {' or '.join(STORE_SCHEMES)}, not {redact(st.url)!r}"
            )
        if not st.url and not st.path:
            raise ConfigError("store.path must not be empty")
        if st.url.startswith("sqlite:") and not st.url.startswith("sqlite:///"):
            raise ConfigError("store.url: a SQLite store is sqlite:///PATH")
        _at_least("store.pool_size", st.pool_size, 1)
        if not 0.5 <= st.lease_seconds <= 60:
            raise ConfigError("store.lease_seconds must be between 0.5 and 60")
        if self.log.format not in logs.FORMATS:
            raise ConfigError(f"log.format must be 'plain' or 'json', not {self.log.format!r}")
        self._validate_tracing()
        a = self.audit
        if a.sync not in ("normal", "full"):
            raise ConfigError(f"audit.sync must be 'normal' or 'full', not {a.sync!r}")
        if a.enabled and not (a.path and a.key_file):
            raise ConfigError("audit.path and audit.key_file must not be empty")
        if not a.timeout_seconds > 0:
            raise ConfigError(f"audit.timeout_seconds must be above 0, not {a.timeout_seconds}")
        _at_least("audit.max_age_days", a.max_age_days, 0)
        _at_least("audit.max_bytes", a.max_bytes, 0)
        if not a.retention_interval_seconds > 0:
            raise ConfigError("audit.retention_interval_seconds must be above 0")
        self._validate_oauth()

    def _validate_tracing(self) -> None:
        tr = self.tracing
        if not 0 <= tr.sample_ratio <= 1:  # also catches NaN
            raise ConfigError(
                f"tracing.sample_ratio must be between 0 and 1, not {tr.sample_ratio}"
            )
        if not tr.timeout_seconds > 0:
            raise ConfigError(f"tracing.timeout_seconds must be above 0, not {tr.timeout_seconds}")
        if tr.enabled and not tr.endpoint.startswith(("http://", "https://")):
            raise ConfigError(
                f"tracing.endpoint must be an http(s) URL (OTLP/HTTP), not {tr.endpoint!r}"
            )

    def _validate_oauth(self) -> None:
        o = self.oauth
        net.parse("oauth.address", o.address)
        if bool(o.cert_file) != bool(o.key_file):
            raise ConfigError("oauth: set both cert_file and key_file, or neither")
        for key, path in (("oauth.cert_file", o.cert_file), ("oauth.key_file", o.key_file)):
            if path and not Path(path).is_file():
                raise ConfigError(f"{key}: no such file {path!r}")
        if not o.session_key_file:
            raise ConfigError("oauth.session_key_file must not be empty")
        _at_least("oauth.session_ttl_seconds", o.session_ttl_seconds, 60)
        _at_least("oauth.code_ttl_seconds", o.code_ttl_seconds, 1)
        if o.code_ttl_seconds > 600:
            raise ConfigError("oauth.code_ttl_seconds must be at most 600 (RFC 6749 4.1.2)")
        _at_least("oauth.refresh_ttl_seconds", o.refresh_ttl_seconds, 60)
        _at_least("oauth.login_max_failures", o.login_max_failures, 1)
        if not o.login_window_seconds > 0:
            raise ConfigError("oauth.login_window_seconds must be above 0")
        if o.enabled and not self.tokens.issuer.startswith(("https://", "http://")):
            raise ConfigError("tokens.issuer must be an http(s) URL: it is the issuer's address")

    @property
    def client_address(self) -> str:
        return self.client.address or self.server.address

    @property
    def store_url(self) -> str:
        """The store as a URL: store.url, else sqlite:///<store.path>."""
        if self.store.url:
            return self.store.url
        return "sqlite:///" + self.store.path

    @property
    def postgres(self) -> bool:
        return is_postgres(self.store.url)

    @property
    def node(self) -> str:
        """cluster.node, else HOSTNAME:PORT of server.address."""
        if self.cluster.node:
            return self.cluster.node
        address = self.server.address
        port = address.rsplit(":", 1)[-1] if not address.startswith(net.UNIX_PREFIX) else "unix"
        return f"{socket.gethostname()}:{port}"


STORE_SCHEMES = ("sqlite:///", *POSTGRES_SCHEMES)


def _at_least(key: str, value: float, low: float) -> None:
    if not value >= low:  # also catches NaN
        raise ConfigError(f"{key} must be at least {low}, not {value}")


def _apply(obj: Any, data: Mapping[str, Any], prefix: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise ConfigError(f"unknown config key {key!r}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {key!r} must be a table")
            _apply(current, value, key + ".")
        else:
            setattr(obj, name, _coerce(key, value, type(current)))


def _coerce(key: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"config key {key!r} must be {kind.__name__}, not {value!r}")


def _from_env(key: str, text: str, kind: type) -> Any:
    try:
        if kind is bool:
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("1", "true", "yes")
        return kind(text)
    except ValueError:
        raise ConfigError(f"environment {key} must be {kind.__name__}, not {text!r}") from None


def _env_overrides(obj: Any, env: Mapping[str, str], prefix: str) -> None:
    for f in dataclasses.fields(obj):
        current = getattr(obj, f.name)
        name = f"{prefix}_{f.name.upper()}"
        if dataclasses.is_dataclass(current):
            _env_overrides(current, env, name)
        elif name in env:
            setattr(obj, f.name, _from_env(name, env[name], type(current)))


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read, override and validate the configuration."""
    env = os.environ if env is None else env
    config = Config()
    explicit = path or env.get("POLICYD_CONFIG")
    file = Path(explicit) if explicit else Path(DEFAULT_FILE)
    if explicit or file.exists():
        try:
            data = tomllib.loads(file.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config {file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config {file} is not UTF-8 text") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {file} is not valid TOML: {exc}") from None
        _apply(config, data, "")
    _env_overrides(config, env, "POLICYD")
    config.validate()
    return config
