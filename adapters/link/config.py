"""The connector's own configuration: one TOML file (docs/link.md, "Configuration").

    hub_url = "https://hub.example.com:8443"        # the hub's link listener
    token_url = "https://auth.example.com/token"    # policyd's authorization server
    client_id = "plant-connector"
    client_secret_file = "/etc/policyd-connector/secret"   # mode 0600
    ca_file = "/etc/policyd-connector/ca.pem"       # trust this CA (default: the system's)
    client_cert_file = ""                           # mutual TLS to the hub
    client_key_file = ""
    transports = ["polling", "websocket"]           # Socket.IO: upgrade to WebSocket
    request_timeout_seconds = 10                    # each request to an upstream
    max_answer_bytes = 8388608                      # an upstream's answer body, at most
    insecure_dev = false                            # allow http:// (development only)

    [reconnect]
    delay_seconds = 1
    delay_max_seconds = 30
    randomization_factor = 0.5

    [sources.plant-mes]
    url = "http://127.0.0.1:8600"

`max_answer_bytes` (default 8 MiB, at most 11 MiB) keeps every answer below the link's
message limit (16 MiB, LINK_MESSAGE_BYTES): a larger message would make Engine.IO close
the link, failing every other request in flight on it. An upstream answer over it is
answered 502 `answer_too_large` instead.

Every error is a ConfigError with a one-line message naming the key. The TLS context is
built here too (the CA file, the client certificate and key must load), so that a bad
file is such a message at start-up, never a traceback.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from adapters.link.wire import TRANSPORTS

# The link's message limit: the hub's max_http_buffer_size and the connector's Socket.IO
# client's max message size.
LINK_MESSAGE_BYTES = 16 << 20
DEFAULT_MAX_ANSWER_BYTES = 8 << 20
# base64 (a body that is not UTF-8) grows a body by 4/3: 11 MiB stays below 16 MiB.
MAX_ANSWER_BYTES = 11 << 20


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Reconnect:
    delay_seconds: float = 1.0
    delay_max_seconds: float = 30.0
    randomization_factor: float = 0.5


@dataclass(frozen=True)
class ConnectorConfig:
    hub_url: str
    token_url: str
    client_id: str
    client_secret: str = field(repr=False)
    sources: dict[str, str]
    ca_file: str = ""
    client_cert_file: str = ""
    client_key_file: str = ""
    transports: tuple[str, ...] = TRANSPORTS
    request_timeout_seconds: float = 10.0
    max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES
    insecure_dev: bool = False
    reconnect: Reconnect = Reconnect()


KEYS = {
    "hub_url",
    "token_url",
    "client_id",
    "client_secret_file",
    "ca_file",
    "client_cert_file",
    "client_key_file",
    "transports",
    "request_timeout_seconds",
    "max_answer_bytes",
    "insecure_dev",
    "reconnect",
    "sources",
}


def _text(doc: dict[str, Any], key: str, required: bool = True) -> str:
    value = doc.get(key, "")
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string")
    if required and not value:
        raise ConfigError(f"{key} is required")
    return value


def _number(doc: dict[str, Any], key: str, default: float, low: float, name: str = "") -> float:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < low:
        raise ConfigError(f"{name or key} must be a number of at least {low:g}")
    return float(value)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url(key: str, value: str, insecure_dev: bool, loopback_ok: bool = False) -> str:
    """An https:// URL; http:// only with insecure_dev, or (`loopback_ok`) to this very
    machine, where nothing sent crosses a network (as RFC 8252 section 8.3 allows
    loopback redirects)."""
    parts = urlsplit(value)
    if parts.scheme not in ("https", "wss", "http", "ws") or not parts.hostname:
        raise ConfigError(f"{key} must be an https:// URL, not {value!r}")
    if parts.scheme in ("http", "ws") and not insecure_dev:
        if loopback_ok and _loopback(parts.hostname):
            return value
        raise ConfigError(
            f"{key} must be https:// (the link is always encrypted; insecure_dev = true"
            " allows http:// for development)"
        )
    return value


def _file(key: str, value: str) -> str:
    if value and not Path(value).is_file():
        raise ConfigError(f"{key}: no such file {value!r}")
    return value


def read_secret(path: str) -> str:
    """The client secret, from a file only its owner may read (as ssh does for keys)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"client_secret_file: cannot read {path!r}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"client_secret_file: {path!r} is not a file")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"client_secret_file: {path!r} is readable by group or others"
            f" (mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it"
        )
    try:
        secret = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"client_secret_file: cannot read {path!r}: {exc.strerror}") from None
    except UnicodeError:
        raise ConfigError(f"client_secret_file: {path!r} is not UTF-8 text") from None
    if not secret:
        raise ConfigError(f"client_secret_file: {path!r} is empty")
    return secret


def _tls_error(exc: OSError) -> str:
    """OpenSSL's reason (`KEY_VALUES_MISMATCH`) in words, or the OS error's."""
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and reason:
        return reason.replace("_", " ").lower()
    if isinstance(exc, ssl.SSLError):
        return "not PEM"
    return str(exc.strerror or exc)


def ssl_context(config: ConnectorConfig) -> ssl.SSLContext:
    """The TLS context for the hub and the token endpoint: the trusted CA (default: the
    system's) and the client certificate for mutual TLS; a file that does not load is a
    ConfigError naming its key."""
    try:
        ctx = ssl.create_default_context(cafile=config.ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"ca_file: cannot load {config.ca_file!r} as PEM certificates: {_tls_error(exc)}"
        ) from None
    if config.client_cert_file:
        try:
            ctx.load_cert_chain(config.client_cert_file, config.client_key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"client_cert_file, client_key_file: cannot load {config.client_cert_file!r}"
                f" with {config.client_key_file!r} (PEM, a key that matches the"
                f" certificate): {_tls_error(exc)}"
            ) from None
    return ctx


def load(path: str | Path) -> ConnectorConfig:
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {str(path)!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return parse(doc)


def parse(doc: dict[str, Any]) -> ConnectorConfig:
    unknown = sorted(set(doc) - KEYS)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}")
    insecure = doc.get("insecure_dev", False)
    if not isinstance(insecure, bool):
        raise ConfigError("insecure_dev must be true or false")
    hub_url = _url("hub_url", _text(doc, "hub_url"), insecure)
    # The token endpoint may be http:// on the connector's own machine (loopback only).
    token_url = _url("token_url", _text(doc, "token_url"), insecure, loopback_ok=True)
    client_id = _text(doc, "client_id")
    secret = read_secret(_text(doc, "client_secret_file"))
    ca_file = _file("ca_file", _text(doc, "ca_file", required=False))
    cert = _file("client_cert_file", _text(doc, "client_cert_file", required=False))
    key = _file("client_key_file", _text(doc, "client_key_file", required=False))
    if bool(cert) != bool(key):
        raise ConfigError("client_cert_file and client_key_file go together")
    transports = doc.get("transports", list(TRANSPORTS))
    if (
        not isinstance(transports, list)
        or not transports
        or not all(t in TRANSPORTS for t in transports)
    ):
        raise ConfigError(f"transports must be a list of {', '.join(TRANSPORTS)}")
    timeout = _number(doc, "request_timeout_seconds", 10.0, 0.001)
    max_answer = doc.get("max_answer_bytes", DEFAULT_MAX_ANSWER_BYTES)
    if isinstance(max_answer, bool) or not isinstance(max_answer, int):
        max_answer = 0
    if not 1 <= max_answer <= MAX_ANSWER_BYTES:
        raise ConfigError(f"max_answer_bytes must be a whole number from 1 to {MAX_ANSWER_BYTES}")
    raw_reconnect = doc.get("reconnect", {})
    if not isinstance(raw_reconnect, dict):
        raise ConfigError("[reconnect] must be a table")
    bad = sorted(
        set(raw_reconnect) - {"delay_seconds", "delay_max_seconds", "randomization_factor"}
    )
    if bad:
        raise ConfigError(f"unknown key reconnect.{bad[0]}")
    reconnect = Reconnect(
        _number(raw_reconnect, "delay_seconds", 1.0, 0.01, "reconnect.delay_seconds"),
        _number(raw_reconnect, "delay_max_seconds", 30.0, 0.01, "reconnect.delay_max_seconds"),
        _number(raw_reconnect, "randomization_factor", 0.5, 0, "reconnect.randomization_factor"),
    )
    if reconnect.delay_max_seconds < reconnect.delay_seconds:
        raise ConfigError("reconnect.delay_max_seconds must be at least reconnect.delay_seconds")
    if reconnect.randomization_factor > 1:
        raise ConfigError("reconnect.randomization_factor must be from 0 to 1")
    raw_sources = doc.get("sources")
    if not isinstance(raw_sources, dict) or not raw_sources:
        raise ConfigError('at least one [sources.NAME] with url = "http://..." is required')
    sources: dict[str, str] = {}
    for name, table in raw_sources.items():
        if (
            not isinstance(table, dict)
            or set(table) != {"url"}
            or not isinstance(table["url"], str)
        ):
            raise ConfigError(f'[sources.{name}] needs exactly url = "http://HOST:PORT"')
        parts = urlsplit(table["url"])
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"sources.{name}.url must be an http:// or https:// URL")
        sources[name] = table["url"].rstrip("/")
    config = ConnectorConfig(
        hub_url=hub_url,
        token_url=token_url,
        client_id=client_id,
        client_secret=secret,
        sources=sources,
        ca_file=ca_file,
        client_cert_file=cert,
        client_key_file=key,
        transports=tuple(transports),
        request_timeout_seconds=timeout,
        max_answer_bytes=max_answer,
        insecure_dev=insecure,
        reconnect=reconnect,
    )
    ssl_context(config)  # every TLS file loads
    return config
