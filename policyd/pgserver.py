"""A private PostgreSQL server in a folder: what `make run-cluster`, the tests and the
benchmarks start, from Debian's `postgresql` package (initdb and pg_ctl), without Docker.

Not used by `policyd serve` itself, which only connects to a server it is given
(store.url). The server listens on 127.0.0.1 at the port asked for and on a Unix socket in
the folder, trusts local connections (it is for one machine; docs/cluster.md says how a
real deployment differs), and is stopped with `pg_ctl stop -m fast`.

PostgreSQL refuses to run as root: when this runs as root, initdb and the server run as the
`postgres` user the Debian package creates, and the folder is made theirs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

USER = "policyd"
DATABASE = "policyd"


def find_bin(name: str) -> str:
    """initdb/pg_ctl/postgres: on PATH, else the newest /usr/lib/postgresql/<v>/bin."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(
        Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    if not versions:
        raise FileNotFoundError(
            f"PostgreSQL's {name} not found: install Debian's postgresql package"
        )
    return str(versions[-1])


def available() -> bool:
    try:
        find_bin("initdb")
        find_bin("pg_ctl")
    except FileNotFoundError:
        return False
    return True


@dataclass
class PgServer:
    """One PostgreSQL cluster in `root` (data in root/data, socket and log beside it)."""

    root: Path
    port: int
    fsync: bool = True  # off for tests: a crash of the test machine loses nothing we keep
    max_connections: int = 300
    _owner: tuple[int, int] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.root = self.root.resolve()
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            self._owner = (pw.pw_uid, pw.pw_gid)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "postgres.log"

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if self._owner is not None:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, cwd="/")

    def init(self) -> None:
        """initdb, once: a superuser `policyd` and a database `policyd`, trust auth."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self._owner is not None:
            os.chown(self.root, *self._owner)
        if (self.data / "PG_VERSION").exists():
            return
        result = self._run(
            find_bin("initdb"),
            "-D",
            str(self.data),
            "-U",
            USER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed: {(result.stderr or result.stdout).strip()}")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# policyd's private server (policyd/pgserver.py)\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.root}'\n"
                f"max_connections = {self.max_connections}\n"
                f"fsync = {'on' if self.fsync else 'off'}\n"
                f"synchronous_commit = {'on' if self.fsync else 'off'}\n"
                f"full_page_writes = {'on' if self.fsync else 'off'}\n"
            )

    def start(self, timeout: float = 30.0) -> None:
        result = self._run(
            find_bin("pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log_file),
            "-o",
            f"-p {self.port}",
            "-w",
            "-t",
            str(int(timeout)),
            "start",
            check=False,
        )
        if result.returncode != 0:
            tail = (
                self.log_file.read_text(errors="replace")[-2000:] if self.log_file.exists() else ""
            )
            raise RuntimeError(f"PostgreSQL did not start: {result.stderr.strip()}\n{tail}")
        self.create_database(DATABASE)

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(
                find_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False
            )

    def running(self) -> bool:
        result = self._run(find_bin("pg_ctl"), "-D", str(self.data), "status", check=False)
        return result.returncode == 0

    def create_database(self, name: str) -> str:
        """Create the database (if missing) and return its URL."""
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
            ).fetchone()
            if exists is None:
                conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def running(root: Path, port: int, *, fsync: bool = True) -> Iterator[PgServer]:
    """A server for the with-block: initialised if new, started, always stopped."""
    server = PgServer(root, port, fsync=fsync)
    server.init()
    try:
        server.start()
        yield server
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    """`python -m policyd.pgserver start|stop|status|url DIR --port N` (scripts/run-cluster.sh).
    status: exit 0 when a server runs in DIR, 3 when none does (as `pg_ctl status`)."""
    parser = argparse.ArgumentParser(prog="python -m policyd.pgserver")
    parser.add_argument("action", choices=["start", "stop", "status", "url"])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--port", type=int, default=55432)
    args = parser.parse_args(argv)
    server = PgServer(args.dir, args.port)
    try:
        if args.action == "start":
            server.init()
            server.start()
            print(server.url())
        elif args.action == "stop":
            server.stop()
        elif args.action == "status":
            if not server.running():
                return 3
        else:
            print(server.url())
    except (OSError, RuntimeError, subprocess.CalledProcessError, KeyError) as exc:
        detail = getattr(exc, "stderr", "") or ""
        print(f"pgserver: {exc} {detail}".strip(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
