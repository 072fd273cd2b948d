"""policyd.config.load_config: defaults, the file, env overrides, one-line errors, the docs."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from policyd.config import Config, load_config
from policyd.core.errors import ConfigError

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


@pytest.fixture(autouse=True)
def _no_file_in_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run each test in an empty directory, so no ./policyd.toml is picked up by accident."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)


def _write(tmp_path: Path, text: str, name: str = "policyd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _pem_files(tmp_path: Path, *names: str) -> dict[str, str]:
    """Empty files standing in for certificates (config checks existence, not contents)."""
    paths = {}
    for name in names:
        path = tmp_path / f"{name}.pem"
        path.write_text("")
        paths[name] = str(path)
    return paths


def _keys(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf key of the config dataclasses as ('section.key', default)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _keys(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def _config_error(path: Path | None = None, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, env={} if env is None else env)
    message = str(info.value)
    assert "\n" not in message, "config errors are one line"
    return message


# -- where the values come from ------------------------------------------------------------


def test_defaults_apply_when_there_is_no_file() -> None:
    config = load_config(None, env={})
    assert config == Config()
    assert config.server.address == "127.0.0.1:50051"
    assert config.store.path == "var/policyd.db"
    assert config.tokens.algorithm == "ES256"
    assert config.client_address == "127.0.0.1:50051"


def test_file_values_replace_the_defaults(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        '[server]\naddress = "0.0.0.0:6000"\nworkers = 3\ngrace_seconds = 2.5\n'
        '[client]\naddress = "10.0.0.1:6000"\ntimeout_seconds = 1.5\n'
        '[store]\npath = "/data/p.db"\n'
        '[tokens]\nissuer = "https://auth.example"\naudience = "hub"\nalgorithm = "EdDSA"\n'
        "ttl_seconds = 60\n"
        "[engine]\nmax_body_bytes = 4096\n",
    )
    config = load_config(path, env={})
    assert config.server.address == "0.0.0.0:6000"
    assert config.server.workers == 3
    assert config.server.grace_seconds == 2.5
    assert config.server.threads == 16  # not in the file: still the default
    assert config.client_address == "10.0.0.1:6000"
    assert config.client.timeout_seconds == 1.5
    assert config.store.path == "/data/p.db"
    assert config.tokens.issuer == "https://auth.example"
    assert config.tokens.audience == "hub"
    assert config.tokens.algorithm == "EdDSA"
    assert config.tokens.ttl_seconds == 60
    assert config.engine.max_body_bytes == 4096


def test_file_sets_nested_tls_table(tmp_path: Path) -> None:
    pem = _pem_files(tmp_path, "cert", "key", "ca")
    path = _write(
        tmp_path,
        f'[server.tls]\ncert_file = "{pem["cert"]}"\nkey_file = "{pem["key"]}"\n'
        f'client_ca_file = "{pem["ca"]}"\n',
    )
    tls = load_config(path, env={}).server.tls
    assert (tls.cert_file, tls.key_file, tls.client_ca_file) == (pem["cert"], pem["key"], pem["ca"])


def test_integer_is_accepted_for_a_seconds_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "[server]\ngrace_seconds = 3\n")
    value = load_config(path, env={}).server.grace_seconds
    assert value == 3.0
    assert isinstance(value, float)


def test_policyd_toml_in_current_directory_is_read_when_nothing_names_a_file() -> None:
    Path("policyd.toml").write_text("[server]\nworkers = 5\n")
    assert load_config(None, env={}).server.workers == 5


def test_policyd_config_env_names_the_file(tmp_path: Path) -> None:
    Path("policyd.toml").write_text("[server]\nworkers = 5\n")
    named = _write(tmp_path, "[server]\nworkers = 6\n", "named.toml")
    assert load_config(None, env={"POLICYD_CONFIG": str(named)}).server.workers == 6


def test_explicit_path_beats_policyd_config_env(tmp_path: Path) -> None:
    explicit = _write(tmp_path, "[server]\nworkers = 7\n", "explicit.toml")
    named = _write(tmp_path, "[server]\nworkers = 6\n", "named.toml")
    assert load_config(explicit, env={"POLICYD_CONFIG": str(named)}).server.workers == 7


def test_load_config_reads_process_environment_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POLICYD_CONFIG", str(_write(tmp_path, "[server]\nthreads = 9\n")))
    monkeypatch.setenv("POLICYD_SERVER_WORKERS", "2")
    config = load_config()
    assert (config.server.threads, config.server.workers) == (9, 2)


# -- environment overrides -----------------------------------------------------------------


def test_env_overrides_beat_file_values(tmp_path: Path) -> None:
    path = _write(tmp_path, '[server]\naddress = "127.0.0.1:6000"\nworkers = 2\n')
    env = {"POLICYD_SERVER_ADDRESS": "127.0.0.1:7000", "POLICYD_SERVER_WORKERS": "4"}
    config = load_config(path, env=env)
    assert config.server.address == "127.0.0.1:7000"
    assert config.server.workers == 4


def test_env_overrides_parse_the_key_type() -> None:
    env = {
        "POLICYD_TOKENS_LEEWAY_SECONDS": "2.5",
        "POLICYD_TOKENS_CACHE_SIZE": "10",
        "POLICYD_TOKENS_ISSUER": "https://issuer.example",
        "POLICYD_STORE_PATH": "/tmp/x.db",
    }
    config = load_config(None, env=env)
    assert config.tokens.leeway_seconds == 2.5
    assert config.tokens.cache_size == 10
    assert config.tokens.issuer == "https://issuer.example"
    assert config.store.path == "/tmp/x.db"


def test_nested_env_override_sets_server_tls_files(tmp_path: Path) -> None:
    pem = _pem_files(tmp_path, "cert", "key")
    env = {"POLICYD_SERVER_TLS_CERT_FILE": pem["cert"], "POLICYD_SERVER_TLS_KEY_FILE": pem["key"]}
    tls = load_config(None, env=env).server.tls
    assert (tls.cert_file, tls.key_file) == (pem["cert"], pem["key"])


def test_every_key_has_an_env_variable_that_overrides_it(tmp_path: Path) -> None:
    pem = _pem_files(tmp_path, "cert", "key", "ca", "client-ca", "client-cert", "client-key")
    values: dict[str, Any] = {
        "server.address": "127.0.0.1:1",
        "server.workers": 2,
        "server.threads": 3,
        "server.cpu_affinity": "0,1",
        "server.grace_seconds": 4.5,
        "server.tls.cert_file": pem["cert"],
        "server.tls.key_file": pem["key"],
        "server.tls.client_ca_file": pem["ca"],
        "client.address": "127.0.0.1:2",
        "client.ca_file": pem["client-ca"],
        "client.cert_file": pem["client-cert"],
        "client.key_file": pem["client-key"],
        "client.timeout_seconds": 6.5,
        "store.url": "postgresql://policyd@db.example:5432/policyd",
        "store.path": "/srv/policyd.db",
        "store.pool_size": 3,
        "store.lease_seconds": 1.5,
        "cluster.node": "node-7",
        "log.format": "json",
        "metrics.address": "127.0.0.1:9464",
        "tracing.enabled": True,
        "tracing.endpoint": "https://collector.example:4318/v1/traces",
        "tracing.sample_ratio": 0.25,
        "tracing.timeout_seconds": 2.5,
        "tokens.issuer": "https://issuer.example",
        "tokens.audience": "audience",
        "tokens.link_audience": "link-audience",
        "tokens.leeway_seconds": 7.5,
        "tokens.max_token_bytes": 300,
        "tokens.ttl_seconds": 8,
        "tokens.key_dir": "/srv/keys",
        "tokens.algorithm": "RS256",
        "tokens.cache_size": 9,
        "engine.max_body_bytes": 10,
        "policy.dir": "/srv/policies",
        "policy.watch_seconds": 0.5,
        "audit.enabled": False,
        "audit.path": "/srv/audit.db",
        "audit.key_file": "/srv/audit.key",
        "audit.sync": "full",
        "audit.timeout_seconds": 1.5,
        "audit.max_age_days": 30.0,
        "audit.max_bytes": 1000000,
        "audit.retention_interval_seconds": 2.5,
        "envoy.enabled": False,
        "envoy.remove_authorization": True,
        "envoy.http_address": "127.0.0.1:4",
        "oauth.enabled": False,
        "oauth.address": "127.0.0.1:3",
        "oauth.cert_file": pem["cert"],
        "oauth.key_file": pem["key"],
        "oauth.session_key_file": "/srv/oauth.key",
        "oauth.session_ttl_seconds": 600,
        "oauth.code_ttl_seconds": 30,
        "oauth.refresh_ttl_seconds": 3600,
        "oauth.login_max_failures": 3,
        "oauth.login_window_seconds": 60.0,
        "oauth.trusted_user_header": "X-Forwarded-User",
    }
    assert set(values) == {key for key, _ in _keys(Config())}, "a key is missing here"
    env = {"POLICYD_" + key.replace(".", "_").upper(): str(v) for key, v in values.items()}
    assert dict(_keys(load_config(None, env=env))) == values


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[server]\nadress = 'x'\n", "server.adress"),
        ("[nope]\na = 1\n", "nope"),
        ("workers = 1\n", "workers"),
        ("[server.tls]\ncert = 'x'\n", "server.tls.cert"),
    ],
)
def test_unknown_key_is_an_error_naming_it(tmp_path: Path, text: str, key: str) -> None:
    message = _config_error(_write(tmp_path, text))
    assert message == f"unknown config key {key!r}"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[server]\nworkers = 'two'\n", "server.workers"),
        ("[server]\nworkers = true\n", "server.workers"),
        ("[server]\nworkers = 1.5\n", "server.workers"),
        ("[server]\ngrace_seconds = '10'\n", "server.grace_seconds"),
        ("[server]\naddress = 50051\n", "server.address"),
        ("[tokens]\nissuer = ['a']\n", "tokens.issuer"),
        ("server = 3\n", "server"),
        ("[server]\ntls = 'on'\n", "server.tls"),
    ],
)
def test_wrong_type_is_an_error_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    message = _config_error(_write(tmp_path, text))
    assert f"config key {key!r} must be" in message


def test_bad_toml_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[server\naddress = \n")
    message = _config_error(path)
    assert message.startswith(f"config {path} is not valid TOML")


def test_config_file_that_is_not_utf8_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "policyd.toml"
    path.write_bytes(b"\xff\xfe[server]\n")
    message = _config_error(path)
    assert str(path) in message


def test_named_file_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    message = _config_error(missing)
    assert message == f"cannot read config {missing}: No such file or directory"
    assert "missing.toml" in _config_error(env={"POLICYD_CONFIG": str(missing)})


def test_directory_as_config_file_is_an_error(tmp_path: Path) -> None:
    assert _config_error(tmp_path).startswith(f"cannot read config {tmp_path}")


@pytest.mark.parametrize("address", ["nope", "host:", ":50051", "host:http", "host:65536", ""])
def test_bad_server_address_is_an_error_naming_the_key(tmp_path: Path, address: str) -> None:
    message = _config_error(_write(tmp_path, f'[server]\naddress = "{address}"\n'))
    assert message == f"server.address must be HOST:PORT, not {address!r}"


def test_bad_client_address_is_an_error_naming_the_key() -> None:
    message = _config_error(env={"POLICYD_CLIENT_ADDRESS": "localhost"})
    assert message == "client.address must be HOST:PORT, not 'localhost'"


def test_bad_envoy_http_address_is_an_error_naming_the_key() -> None:
    message = _config_error(env={"POLICYD_ENVOY_HTTP_ADDRESS": "localhost"})
    assert message == "envoy.http_address must be HOST:PORT, not 'localhost'"


@pytest.mark.parametrize(
    ("var", "value", "kind"),
    [
        ("POLICYD_SERVER_WORKERS", "many", "int"),
        ("POLICYD_SERVER_WORKERS", "1.5", "int"),
        ("POLICYD_TOKENS_LEEWAY_SECONDS", "soon", "float"),
        ("POLICYD_ENGINE_MAX_BODY_BYTES", "", "int"),
    ],
)
def test_bad_env_value_is_an_error_naming_the_variable(var: str, value: str, kind: str) -> None:
    message = _config_error(env={var: value})
    assert message == f"environment {var} must be {kind}, not {value!r}"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[server]\nworkers = 0\n", "server.workers"),
        ('[server]\ncpu_affinity = "fastest"\n', "server.cpu_affinity"),
        ("[server]\nthreads = 0\n", "server.threads"),
        ("[server]\ngrace_seconds = -1\n", "server.grace_seconds"),
        ("[tokens]\nleeway_seconds = 301\n", "tokens.leeway_seconds"),
        ("[tokens]\nmax_token_bytes = 100\n", "tokens.max_token_bytes"),
        ("[tokens]\nttl_seconds = 0\n", "tokens.ttl_seconds"),
        ("[tokens]\ncache_size = 0\n", "tokens.cache_size"),
        ("[tokens]\nalgorithm = 'HS256'\n", "tokens.algorithm"),
        ("[tokens]\nissuer = ''\n", "tokens.issuer"),
        ("[tokens]\naudience = ''\n", "tokens.audience"),
        ("[tokens]\nlink_audience = ''\n", "tokens.link_audience must not be empty"),
        ("[tokens]\nlink_audience = 'policyd-hub'\n", "tokens.link_audience must differ"),
        ("[engine]\nmax_body_bytes = 0\n", "engine.max_body_bytes"),
        ("[store]\npath = ''\n", "store.path"),
        ("[store]\nurl = 'mysql://db/x'\n", "store.url"),
        ("[store]\nurl = 'sqlite://relative.db'\n", "store.url"),
        ("[store]\npool_size = 0\n", "store.pool_size"),
        ("[store]\nlease_seconds = 0.1\n", "store.lease_seconds"),
        ("[log]\nformat = 'xml'\n", "log.format"),
        ("[tracing]\nsample_ratio = 1.5\n", "tracing.sample_ratio"),
        ("[tracing]\nsample_ratio = -0.1\n", "tracing.sample_ratio"),
        ("[tracing]\nsample_ratio = nan\n", "tracing.sample_ratio"),
        ("[tracing]\nenabled = true\nendpoint = '127.0.0.1:4318'\n", "tracing.endpoint"),
    ],
)
def test_invalid_value_is_an_error_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    assert _config_error(_write(tmp_path, text)).startswith(key)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[client]\ntimeout_seconds = 0\n", "client.timeout_seconds"),
        ("[client]\ntimeout_seconds = -5\n", "client.timeout_seconds"),
        ("[server]\ngrace_seconds = nan\n", "server.grace_seconds"),
        ("[tracing]\ntimeout_seconds = 0\n", "tracing.timeout_seconds"),
    ],
)
def test_nonsense_timeouts_are_errors_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    assert _config_error(_write(tmp_path, text)).startswith(key)


def test_tls_cert_without_key_is_an_error(tmp_path: Path) -> None:
    pem = _pem_files(tmp_path, "cert")
    message = _config_error(env={"POLICYD_SERVER_TLS_CERT_FILE": pem["cert"]})
    assert message == "server.tls: set both cert_file and key_file, or neither"


def test_client_ca_without_server_cert_is_an_error(tmp_path: Path) -> None:
    pem = _pem_files(tmp_path, "ca")
    message = _config_error(env={"POLICYD_SERVER_TLS_CLIENT_CA_FILE": pem["ca"]})
    assert message == "server.tls.client_ca_file needs cert_file and key_file"


def test_missing_certificate_file_is_an_error_naming_the_key(tmp_path: Path) -> None:
    pem = _pem_files(tmp_path, "key")
    env = {
        "POLICYD_SERVER_TLS_CERT_FILE": "/nonexistent.pem",
        "POLICYD_SERVER_TLS_KEY_FILE": pem["key"],
    }
    message = _config_error(env=env)
    assert message == "server.tls.cert_file: no such file '/nonexistent.pem'"


def test_client_cert_without_key_is_an_error(tmp_path: Path) -> None:
    pem = _pem_files(tmp_path, "ca", "cert")
    env = {"POLICYD_CLIENT_CA_FILE": pem["ca"], "POLICYD_CLIENT_CERT_FILE": pem["cert"]}
    message = _config_error(env=env)
    assert message == "client: set both cert_file and key_file, or neither"


# -- docs/configuration.md -----------------------------------------------------------------


def _doc_rows() -> dict[str, str]:
    """Key -> default cell of each row of the key tables: | `key` | type | `default` | ... |."""
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"^\| `([a-z_.]+)` \| [^|]+ \| `([^`]*)` \|", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


@pytest.mark.parametrize(("key", "default"), list(_keys(Config())), ids=lambda v: str(v))
def test_every_key_is_documented_with_its_default(key: str, default: object) -> None:
    text = DOC.read_text()
    assert f"`{key}`" in text, f"docs/configuration.md does not mention {key}"
    rows = _doc_rows()
    assert key in rows, f"docs/configuration.md has no table row for {key}"
    if isinstance(default, bool):
        expected = str(default).lower()  # as TOML writes it
    else:
        expected = f'"{default}"' if isinstance(default, str) else str(default)
    assert rows[key] == expected


def test_docs_document_no_key_that_does_not_exist() -> None:
    assert set(_doc_rows()) == {key for key, _ in _keys(Config())}


def _toml_blocks() -> list[str]:
    return re.findall(r"```toml\n(.*?)```", DOC.read_text(), flags=re.S)


def _toml_keys(data: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for name, value in data.items():
        if isinstance(value, dict):
            keys |= _toml_keys(value, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def test_example_config_in_the_docs_sets_every_key_and_loads(tmp_path: Path) -> None:
    example = _toml_blocks()[0]
    assert _toml_keys(tomllib.loads(example)) == {key for key, _ in _keys(Config())}
    config = load_config(_write(tmp_path, example), env={})
    assert config.server.workers == 4
    assert config.tokens.issuer == "https://auth.example.com"


def test_tls_examples_in_the_docs_load(tmp_path: Path) -> None:
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    for name in ("server.crt", "server.key", "ca.crt", "client.crt", "client.key"):
        (tls_dir / name).write_text("")
    blocks = _toml_blocks()[1:]
    assert len(blocks) == 2
    for block in blocks:
        text = block.replace("/etc/policyd/tls/", f"{tls_dir}/")
        config = load_config(_write(tmp_path, text), env={})
        assert config.server.tls.cert_file == f"{tls_dir}/server.crt"
    assert config.server.tls.client_ca_file == f"{tls_dir}/ca.crt"
    assert config.client.cert_file == f"{tls_dir}/client.crt"


def test_a_bad_store_url_is_named_without_its_password() -> None:
    message = _config_error(env={"POLICYD_STORE_URL": "mysql://admin:hunter2@db/x"})
    assert message.startswith("store.url must start with") and "hunter2" not in message
    assert "mysql://admin:***@db/x" in message


def test_the_store_url_defaults_to_the_sqlite_path_and_postgres_is_recognised() -> None:
    config = load_config(None, env={"POLICYD_STORE_PATH": "/srv/p.db"})
    assert (config.store_url, config.postgres) == ("sqlite:////srv/p.db", False)
    config = load_config(None, env={"POLICYD_STORE_URL": "postgresql://u@h:5432/db"})
    assert (config.store_url, config.postgres) == ("postgresql://u@h:5432/db", True)
    assert load_config(None, env={"POLICYD_CLUSTER_NODE": "n1"}).node == "n1"
    node = load_config(None, env={"POLICYD_SERVER_ADDRESS": "127.0.0.1:7001"}).node
    assert node.endswith(":7001")
