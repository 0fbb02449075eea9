"""`keras-l2 team-server`: PostgreSQL and an MLflow server with basic auth, for a search across machines.

It starts a local PostgreSQL (`keras_l2.search.postgres`) with one database
for Optuna's studies and one for MLflow (its runs and its users), then
`mlflow server --app-name basic-auth` on it. MLflow ships no default admin
password: one is generated, with the Flask secret key and the database's
password, and kept in `<directory>/credentials.env` (mode 600), which a
worker reads with `set -a; . credentials.env; set +a`. No secret is printed.

Example (the command's defaults; `tests/test_study.py` starts one):

>>> from keras_l2.cli import parser
>>> args = parser()[0].parse_args(["team-server"])
>>> args.dir, args.host, args.port, args.database_port
('mlruns/team', '127.0.0.1', 5000, 5433)
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from keras_l2.search.postgres import PostgresServer, free_port, start_postgres, write_private

DIRECTORY = "mlruns/team"  # under the working directory, beside the embedded store
ADMIN = "admin"
START_TIMEOUT = 120.0
AUTH_CACHE_SECONDS = 60


@dataclasses.dataclass
class TeamServer:
    """The running PostgreSQL and MLflow server; `stop()` stops both."""

    directory: Path
    postgres: PostgresServer
    process: subprocess.Popen
    tracking_uri: str
    storage: str  # Optuna's storage URL (with the database password)
    password: str  # the MLflow admin's

    @property
    def credentials(self) -> Path:
        return self.directory / "credentials.env"

    def instructions(self, study: str = "my-sweep") -> str:
        """What to run on a worker, and where the UI is; no secret in it."""
        return "\n".join([
            f"MLflow UI: {self.tracking_uri} (user {ADMIN}; the password is in {self.credentials})",
            f"Credentials (mode 600): {self.credentials}",
            "On each worker (copy the credentials file there; it names this machine's addresses):",
            f"  set -a; . {self.credentials}; set +a",
            f"  keras-l2 sweep --study {study} --tracking-uri {self.tracking_uri}    # --storage: $KERAS_L2_STORAGE",
        ])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.postgres.stop()


def start_team_server(directory=DIRECTORY, host: str = "127.0.0.1", port: int = 5000,
                      database_host: str = "127.0.0.1", database_port: int | None = None) -> TeamServer:
    """Starts PostgreSQL and `mlflow server --app-name basic-auth` (see the module docstring); `port=0`: a free one.

    Raises:
        RuntimeError: PostgreSQL is missing, or a server did not start (its log is named).
    """
    directory = Path(directory).resolve()
    postgres = start_postgres(directory / "postgres", host=database_host, port=database_port)
    try:
        storage = postgres.create_database("optuna")
        backend = postgres.create_database("mlflow")
        secrets_file = directory / "server-secrets.env"
        if not secrets_file.exists():
            write_private(secrets_file, f"MLFLOW_AUTH_ADMIN_PASSWORD={secrets.token_urlsafe(18)}\n"
                                         f"MLFLOW_FLASK_SERVER_SECRET_KEY={secrets.token_hex(32)}\n")
        server_env = dict(line.split("=", 1) for line in secrets_file.read_text().split())
        password = server_env["MLFLOW_AUTH_ADMIN_PASSWORD"]
        config = directory / "basic_auth.ini"
        # Users the admin adds may create and log runs (MLflow's default is READ); auth tables in the same database.
        # A checked password is cached for 60 s: MLflow otherwise hashes it (PBKDF2) on every request, which cost
        # the server 4.2 s of CPU per run of a sweep here (a password change reaches every server worker in 60 s).
        write_private(config, f"[mlflow]\ndefault_permission = EDIT\ndatabase_uri = {backend}\n"
                               f"admin_username = {ADMIN}\nauth_cache_ttl_seconds = {AUTH_CACHE_SECONDS}\n"
                               "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        port = port or free_port(host)
        # What workers connect to: on every interface (0.0.0.0), this machine's name.
        tracking_uri = f"http://{socket.gethostname() if host == '0.0.0.0' else host}:{port}"
        if database_host == "0.0.0.0":
            storage = postgres.url("optuna", host=socket.gethostname())
        write_private(directory / "credentials.env", f"MLFLOW_TRACKING_USERNAME={ADMIN}\n"
                                                      f"MLFLOW_TRACKING_PASSWORD={password}\n"
                                                      f"KERAS_L2_STORAGE={storage}\n"
                                                      f"MLFLOW_TRACKING_URI={tracking_uri}\n")
        artifacts = directory / "artifacts"
        artifacts.mkdir(exist_ok=True)
        log = open(directory / "mlflow-server.log", "ab")  # noqa: SIM115 - owned by the process
        # The database URL (with its password) by environment, not argument: every local user can read arguments.
        env = {**os.environ, **server_env, "MLFLOW_AUTH_CONFIG_PATH": str(config),
               "MLFLOW_BACKEND_STORE_URI": backend, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        command = [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--app-name", "basic-auth",
                   "--artifacts-destination", str(artifacts),
                   "--host", host, "--port", str(port), "--workers", "2"]
        process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True, env=env)
    except BaseException:
        postgres.stop()
        raise
    team = TeamServer(directory, postgres, process, tracking_uri, storage, password)
    _wait_until_up(team, directory / "mlflow-server.log")
    return team


def _wait_until_up(team: TeamServer, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if team.process.poll() is not None:
            team.postgres.stop()
            raise RuntimeError(f"mlflow server exited (code {team.process.returncode}); see {log}:\n"
                               f"{log.read_text()[-1500:]}")
        try:
            with urllib.request.urlopen(f"{team.tracking_uri}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    team.stop()
    raise RuntimeError(f"mlflow server not up on {team.tracking_uri} after {START_TIMEOUT:g} s; see {log}")
