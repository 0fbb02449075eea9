"""A local PostgreSQL server in a folder of the project's choosing, for the team server and its tests.

Debian's `postgresql` package provides the programs (`make team-server`
installs it if missing); the cluster lives in `directory`, listens on
127.0.0.1 (or `host`) only, and accepts one user, with a generated password
kept in an owner-only file. PostgreSQL refuses to run as root: as root, the
programs run as the package's `postgres` user, who is given the folder.

Example (skipped where PostgreSQL is not installed):

>>> import os, tempfile
>>> from keras_l2.search.postgres import find_programs, start_postgres
>>> if find_programs() is not None:
...     with tempfile.TemporaryDirectory() as root:
...         os.chmod(root, 0o755)  # as root, the server's user must enter it
...         server = start_postgres(root)
...         url = server.create_database("demo")
...         server.stop()
...     url.startswith("postgresql+psycopg://keras_l2:")
... else:
...     True
True
"""

from __future__ import annotations

import dataclasses
import glob
import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

USER = "keras_l2"
START_TIMEOUT = 60.0


def find_programs() -> Path | None:
    """The folder of PostgreSQL's server programs (`initdb`, `pg_ctl`, `postgres`), or None if not installed."""
    on_path = shutil.which("pg_ctl")
    if on_path and Path(on_path).resolve().with_name("initdb").exists():
        return Path(on_path).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class PostgresServer:
    """A running cluster: `url(database)` is the SQLAlchemy URL for one of its databases."""

    directory: Path
    host: str
    port: int
    password: str
    programs: Path

    def url(self, database: str, host: str | None = None) -> str:
        """The URL of `database`, reached at `host` (default: where the server listens; 0.0.0.0: this machine)."""
        host = host or ("127.0.0.1" if self.host == "0.0.0.0" else self.host)
        return f"postgresql+psycopg://{USER}:{self.password}@{host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Creates database `name` if it does not exist; returns its URL."""
        import sqlalchemy

        engine = sqlalchemy.create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                exists = connection.execute(sqlalchemy.text("SELECT 1 FROM pg_database WHERE datname = :n"),
                                            {"n": name}).first()
                if not exists:
                    connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return self.url(name)

    def stop(self) -> None:
        _run([self.programs / "pg_ctl", "-D", self.directory / "data", "-m", "fast", "-w", "stop"],
             self.directory, check=False)


def start_postgres(directory, host: str = "127.0.0.1", port: int | None = None) -> PostgresServer:
    """Starts (creating it on first use) the cluster in `directory`/data; returns the running server.

    The password is generated once and kept in `directory`/password (mode 600).

    Raises:
        RuntimeError: PostgreSQL is not installed, or the server did not start (its log is named).
    """
    programs = find_programs()
    if programs is None:
        raise RuntimeError("PostgreSQL is not installed: `make team-server` installs Debian's postgresql package, "
                           "or install it yourself (apt-get install postgresql).")
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    password_file = directory / "password"
    if not password_file.exists():
        write_private(password_file, secrets.token_urlsafe(24) + "\n")
    password = password_file.read_text().strip()
    data = directory / "data"
    if not (data / "PG_VERSION").exists():
        _give_to_server_user(directory)
        pwfile = directory / ".initdb-password"
        write_private(pwfile, password + "\n")
        _give_to_server_user(pwfile)
        try:
            _run([programs / "initdb", "-D", data, "-U", USER, "--auth=scram-sha-256", f"--pwfile={pwfile}",
                  "-E", "UTF8", "--locale=C"], directory)
        finally:
            pwfile.unlink(missing_ok=True)
    if host not in ("127.0.0.1", "localhost"):  # initdb lets in this machine only; others with the password
        hba = data / "pg_hba.conf"
        rule = "host all all 0.0.0.0/0 scram-sha-256"
        if rule not in hba.read_text():
            hba.write_text(hba.read_text() + f"\n{rule}\n")
    port = port or free_port(host)
    log = directory / "postgres.log"
    # Only `host` listens; no Unix socket in a shared folder; the server's own settings win over any file.
    options = f"-c listen_addresses={host} -c port={port} -c unix_socket_directories='' -c max_connections=200"
    _give_to_server_user(directory)
    _run([programs / "pg_ctl", "-D", data, "-l", log, "-o", options, "-w", "-t", str(int(START_TIMEOUT)),
          "start"], directory)
    server = PostgresServer(directory, host, port, password, programs)
    _wait_until_up(server, log)
    return server


def _wait_until_up(server: PostgresServer, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((server.host, server.port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"PostgreSQL did not start on {server.host}:{server.port}; see {log}")


def write_private(path: Path, text: str) -> None:
    """Writes `text` to `path`, readable by its owner only (mode 600) from the first byte."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as f:
        f.write(text)


def _as_root() -> bool:
    return os.geteuid() == 0


def _give_to_server_user(path: Path) -> None:
    """As root, the `postgres` user runs the server: it must own the folder (and reach it)."""
    if not _as_root():
        return
    import pwd

    entry = pwd.getpwnam("postgres")
    for parent in path.parents:
        if not os.stat(parent).st_mode & 0o001:
            raise RuntimeError(f"PostgreSQL refuses to run as root, so it runs as the user postgres, who cannot "
                               f"enter {parent}: choose a folder below ones others may enter, or "
                               f"`chmod o+x {parent}`.")
    paths = [path]
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            paths += [Path(root, name) for name in dirs + files]
    for name in paths:
        os.chown(name, entry.pw_uid, entry.pw_gid)


def _run(command: list, directory: Path, check: bool = True) -> subprocess.CompletedProcess:
    command = [str(part) for part in command]
    program = Path(command[0]).name
    if _as_root():  # PostgreSQL refuses to run as root
        command = ["runuser", "-u", "postgres", "--", *command]
    result = subprocess.run(command, cwd=directory, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{program} failed "
                           f"(exit {result.returncode}): {(result.stderr or result.stdout).strip()[-500:]}")
    return result
