"""policyd-connector's configuration, its start and stop, and the local CA (certs.py)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from adapters.link.certs import ensure
from adapters.link.config import LINK_MESSAGE_BYTES, MAX_ANSWER_BYTES, load
from adapters.link.connector import backoff, main
from adapters.link.wire import LinkResponse
from tests.helpers import ROOT, free_port
from tests.link_support import start_connector, write_config


def _config(tmp_path: Path, **changes: str) -> Path:
    path = write_config(
        tmp_path,
        "conn-a",
        hub_url="https://127.0.0.1:9",
        token_url="https://127.0.0.1:9/token",
        secret="s3cret",
        sources={"ds-a": "http://127.0.0.1:9"},
        insecure=False,
    )
    text = path.read_text()
    for old, new in changes.items():
        text = text.replace(old, new)
    path.write_text(text)
    return path


def _refused(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("policyd-connector: error: ") and err.count("\n") == 1, err
    return err


def test_a_secret_file_others_can_read_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _config(tmp_path)
    (tmp_path / "conn-a.secret").chmod(0o644)
    assert "readable by group or others (mode 0644); chmod 600 it" in _refused(path, capsys)


def test_plain_http_is_refused_unless_insecure_dev(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _config(tmp_path, **{'https://127.0.0.1:9"': 'http://127.0.0.1:9"'})
    assert "hub_url must be https://" in _refused(path, capsys)
    token = _config(tmp_path, **{"https://127.0.0.1:9/token": "http://auth.example:9/token"})
    assert "token_url must be https://" in _refused(token, capsys)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.0.1", "[::1]", "localhost"])
def test_a_plain_http_token_endpoint_on_this_machine_is_taken(tmp_path: Path, host: str) -> None:
    """Loopback only: the secret never crosses a network (the hub URL stays https://)."""
    path = _config(tmp_path, **{"https://127.0.0.1:9/token": f"http://{host}:9/token"})
    assert load(path).token_url == f"http://{host}:9/token"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({'[sources.ds-a]\nurl = "http://127.0.0.1:9"': ""}, "at least one [sources.NAME]"),
        ({'client_id = "conn-a"': "client_idd = 1"}, "unknown key 'client_idd'"),
        ({"delay_seconds = 0.2": "delay_seconds = -1"}, "reconnect.delay_seconds"),
        ({"insecure_dev = false": "insecure_dev = false\ntransports = ['carrier']"}, "transports"),
        ({"insecure_dev = false": "insecure_dev = false\nca_file = '/nonexistent'"}, "ca_file"),
        ({'url = "http://127.0.0.1:9"': 'url = "ftp://x"'}, "sources.ds-a.url"),
        ({"hub_url": "hub_url = [\n"}, "conn-a.toml"),
        ({"insecure_dev = false": "insecure_dev = false\nmax_answer_bytes = 0"}, "max_answer"),
        ({"insecure_dev = false": "insecure_dev = false\nmax_answer_bytes = 1e6"}, "max_answer"),
        (
            {"insecure_dev = false": "insecure_dev = false\nmax_answer_bytes = 16777216"},
            "max_answer_bytes must be a whole number from 1 to 11534336",
        ),
    ],
)
def test_configuration_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, str], message: str
) -> None:
    assert message in _refused(_config(tmp_path, **change), capsys)


def _tls_files(tmp_path: Path) -> tuple[Path, Path]:
    """A local CA (certs.py) and another, for certificates and keys that do not match."""
    ensure(tmp_path / "tls")
    ensure(tmp_path / "other")
    return tmp_path / "tls", tmp_path / "other"


def _unreadable(path: Path) -> Path:
    path.chmod(0)
    return path


@pytest.mark.parametrize(
    ("files", "message"),
    [
        # a file that is not PEM (it was a traceback, exit 1)
        (lambda tls, other: {"ca_file": tls / "ca.key"}, "ca_file: cannot load"),
        (lambda tls, other: {"ca_file": tls}, "ca_file: no such file"),
        (
            lambda tls, other: {
                "client_cert_file": tls / "client.pem",
                "client_key_file": other / "client.key",
            },
            "client_cert_file, client_key_file: cannot load",
        ),
        (
            lambda tls, other: {
                "client_cert_file": tls / "ca.key",
                "client_key_file": tls / "client.key",
            },
            "client_cert_file, client_key_file: cannot load",
        ),
        (
            lambda tls, other: {"ca_file": _unreadable(tls / "ca.pem")},
            "ca_file: cannot load",
        ),
    ],
    ids=["ca-not-pem", "ca-directory", "key-of-another-cert", "cert-not-pem", "ca-unreadable"],
)
def test_tls_files_that_do_not_load_are_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    files: Callable[[Path, Path], dict[str, Path]],
    message: str,
) -> None:
    tls, other = _tls_files(tmp_path)
    chosen = files(tls, other)
    if any(stat.S_IMODE(p.stat().st_mode) == 0 for p in chosen.values()) and os.geteuid() == 0:
        pytest.skip("root reads a file of mode 000")
    lines = "".join(f'{key} = "{path}"\n' for key, path in chosen.items())
    path = _config(tmp_path, **{"insecure_dev = false": f"insecure_dev = false\n{lines}"})
    assert message in _refused(path, capsys)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: (p.unlink(), p.mkdir(mode=0o700)), "is not a file"),
        (lambda p: p.write_bytes(b"\xff\xfe s3cret"), "is not UTF-8 text"),
        (lambda p: p.write_text(""), "is empty"),
        (lambda p: p.unlink(), "cannot read"),
        (lambda p: p.chmod(0), "cannot read"),
    ],
    ids=["directory", "not-utf8", "empty", "missing", "unreadable"],
)
def test_a_secret_file_that_does_not_read_is_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make: Callable[[Path], object],
    message: str,
) -> None:
    path = _config(tmp_path)
    secret = tmp_path / "conn-a.secret"
    make(secret)
    if message == "cannot read" and secret.exists() and os.geteuid() == 0:
        pytest.skip("root reads a file of mode 000")
    err = _refused(path, capsys)
    assert "client_secret_file: " in err and message in err


def test_a_valid_tls_configuration_loads(tmp_path: Path) -> None:
    tls, _ = _tls_files(tmp_path)
    lines = (
        f'ca_file = "{tls / "ca.pem"}"\nclient_cert_file = "{tls / "client.pem"}"\n'
        f'client_key_file = "{tls / "client.key"}"\n'
    )
    config = load(_config(tmp_path, **{"insecure_dev = false": f"insecure_dev = false\n{lines}"}))
    assert config.client_cert_file.endswith("client.pem")
    assert config.max_answer_bytes == 8 << 20


def test_the_secret_is_not_in_the_configs_repr(tmp_path: Path) -> None:
    config = load(_config(tmp_path))
    assert config.client_secret == "s3cret"
    assert "s3cret" not in repr(config) and "s3cret" not in str(config)


def test_a_missing_config_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "cannot read" in _refused(tmp_path / "nope.toml", capsys)


def test_the_console_script_is_declared() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert 'policyd-connector = "adapters.link.connector:main"' in text


def test_back_off_doubles_up_to_the_cap_with_jitter() -> None:
    delays = backoff(1.0, 8.0, 0.5)
    got = [next(delays) for _ in range(6)]
    for want, value in zip([1, 2, 4, 8, 8, 8], got, strict=True):
        assert want - 0.5 <= value <= want + 0.5


def test_sigterm_and_ctrl_c_stop_it_cleanly(tmp_path: Path) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        path = write_config(
            tmp_path,
            "conn-a",
            hub_url=f"http://127.0.0.1:{free_port()}",
            token_url=f"http://127.0.0.1:{free_port()}/token",
            secret="s3cret",
            sources={"ds-a": "http://127.0.0.1:9"},
        )
        connector = start_connector(path)
        log = connector.wait_log("cannot connect to the hub")
        assert connector.stop(sig) == 0
        log = connector.log()
        assert "stopped" in log and "Traceback" not in log, log
        assert "s3cret" not in log


def test_the_local_ca_is_made_once_with_private_keys(tmp_path: Path) -> None:
    folder = tmp_path / "tls"
    reply = subprocess.run(
        [sys.executable, "-m", "adapters.link.certs", "--dir", str(folder)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert reply.returncode == 0, reply.stderr
    assert "wrote ca.pem, ca.key, server.pem, server.key, client.pem, client.key" in reply.stdout
    for key in ("ca.key", "server.key", "client.key"):
        assert stat.S_IMODE((folder / key).stat().st_mode) == 0o600
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert ensure(folder) == []  # idempotent: valid files are kept
    assert before == {p.name: p.read_bytes() for p in folder.iterdir()}
    server = x509.load_pem_x509_certificate((folder / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    server.verify_directly_issued_by(
        x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
    )
    # A damaged server key is made anew; the CA is kept.
    (folder / "server.key").write_text("garbage")
    assert ensure(folder) == ["server.pem", "server.key"]
    assert (folder / "ca.pem").read_bytes() == before["ca.pem"]


@pytest.mark.parametrize(
    "unit",
    [b"\x01", "\U0001f600".encode(), b"\xff", b"{}"],
    ids=["control", "astral", "binary", "json"],
)
def test_any_answer_within_max_answer_bytes_travels_within_the_link_limit(unit: bytes) -> None:
    """JSON escaping (Socket.IO sends ASCII) grows text up to 12 times (\\u0001 is 6 bytes,
    an emoji 12): a large body travels as base64, whose size its length alone decides, so
    an answer of the largest size the config allows fits the link's message whatever its
    bytes, and comes back as it was."""
    body = (unit * (MAX_ANSWER_BYTES // len(unit) + 1))[:MAX_ANSWER_BYTES]
    answer = LinkResponse(200, [("content-type", "application/octet-stream")], body)
    message = json.dumps(answer.encode())  # as python-socketio encodes an ack's payload
    assert len(message) <= LINK_MESSAGE_BYTES
    assert LinkResponse.decode(json.loads(message)).body == body
