"""A real `mlflow server` process on 127.0.0.1, started, killed and restarted by tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from keras_l2.search.postgres import free_port  # one free-port helper for the library and the tests


class MlflowServer:
    """`mlflow server` over a SQLite store, on a fixed port across restarts."""

    def __init__(self, directory: Path, port: int | None = None, store: str | None = None):
        self.directory = Path(directory)
        self.port = port or free_port()
        self.store = store or f"sqlite:///{self.directory / 'server.db'}"
        self.uri = f"http://127.0.0.1:{self.port}"
        self._process = None

    def start(self, timeout: float = 90.0) -> MlflowServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            os.path.join(os.path.dirname(sys.executable), "mlflow"), "server",
            "--backend-store-uri", self.store,
            "--default-artifact-root", (self.directory / "artifacts").as_uri(),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]
        log = open(self.directory / "server.log", "ab")  # noqa: SIM115 - owned by the process
        # Its own process group: the server forks workers, and kill() must take them all.
        # No job runner: its half-dozen huey consumer processes take CPU the tests' training needs.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self._process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.directory / 'server.log').read_text()[-2000:]}")
            if self.healthy():
                return self
            time.sleep(0.2)
        raise RuntimeError(f"mlflow server not up after {timeout} s")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL, as a crash: no graceful shutdown, open requests are cut."""
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(timeout=30)
        self._process = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.kill()
        return False
