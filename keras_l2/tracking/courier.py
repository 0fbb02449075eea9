"""The parent side of the delivery process (`keras_l2.tracking.worker`): start it, talk to it, restart it.

One process per request timeout serves every outbox of this process (a
sweep's loggers share it; starting one means importing MLflow, about a
second of CPU). It is started with `subprocess.Popen` (see `BOOTSTRAP`), not `multiprocessing`,
which would re-import the user's `__main__` (a script without an
`if __name__ == "__main__":` guard would train again). MLflow's documented
HTTP settings are set in its environment only:

- `keras_l2.tracking.store.unretried_requests`: one try per request, of at
  most the outbox's request timeout: the outbox retries, so a dead server
  costs one short request, not MLflow's four minutes of retries;
- `MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT`, `MLFLOW_ENABLE_ASYNC_LOGGING=false`.

A process that dies, or does not answer within `reply_timeout(job)`, is
killed; `call` raises `CourierError`, and the next call starts a new one.

Example:

>>> import tempfile
>>> from keras_l2.tracking.courier import courier_for
>>> with tempfile.TemporaryDirectory() as root:
...     reply = courier_for(5.0).call({"job": 7, "store": {"tracking_uri": f"sqlite:///{root}/m.db"},
...                                    "runs": {}, "records": []})
>>> reply["job"], reply["done"]
(7, 0)
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from keras_l2.tracking.records import coalesce, to_json
from keras_l2.tracking.store import unretried_requests

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder that holds keras_l2/
# The delivery process must not import Keras or TensorFlow (seconds, and a GB). `keras_l2/__init__.py`
# imports Keras, so the process loads `keras_l2` as a bare package (its __init__ not run) and imports
# only `keras_l2.tracking`, whose own __init__ imports nothing. With a lazy `keras_l2/__init__.py`,
# `python -m keras_l2.tracking.worker` would do the same.
BOOTSTRAP = (
    "import sys, types\n"
    "package = types.ModuleType('keras_l2')\n"
    f"package.__path__ = [{str(Path(_PACKAGE_ROOT) / 'keras_l2')!r}]\n"
    "sys.modules.setdefault('keras_l2', package)\n"
)
_COURIERS: dict[int, Courier] = {}  # one per request timeout: the process-wide owner of the children
_COURIERS_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Reply:
    """What became of the records of one `Courier.deliver` call.

    Attributes:
        settled: how many of the records, from the first, are done with (delivered or refused).
        runs: run key -> id of the runs created.
        refused: what the store refused for good (`op`, `key`, `run_id`, `error` each).
        error: the outage that stopped delivery at record `settled` (None: all went).
        cpu: CPU seconds the delivery process spent.
    """

    settled: int
    runs: dict
    refused: list
    error: str | None
    cpu: float


class CourierError(Exception):
    """The delivery process died or did not answer; the job may be retried."""


def courier_for(request_timeout: float) -> Courier:
    """The shared `Courier` whose process bounds requests at `request_timeout` s (rounded up)."""
    seconds = max(1, math.ceil(request_timeout))
    with _COURIERS_LOCK:
        courier = _COURIERS.get(seconds)
        if courier is None or courier.owner_pid != os.getpid():  # a forked child needs its own
            courier = _COURIERS[seconds] = Courier(seconds)
        return courier


class Courier:
    """One delivery process and its pipes; `call` sends a job and returns the reply.

    Args:
        request_timeout: whole seconds one HTTP request may take in the process.
    """

    def __init__(self, request_timeout: int):
        self.request_timeout = int(request_timeout)
        self.owner_pid = os.getpid()
        self._lock = threading.Lock()  # one job at a time on the pipe
        self._process: subprocess.Popen | None = None
        self._buffer = b""
        self._jobs = itertools.count(1)
        self._warming: threading.Thread | None = None
        self._warm_lock = threading.Lock()
        self._local_lock = threading.Lock()
        self._local = None  # a `worker.Deliverer` in this process, for local stores while the process starts
        self.ready = threading.Event()  # set once the running process has answered
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        """The delivery process's pid (None before the first call)."""
        return None if self._process is None else self._process.pid

    def environment(self) -> dict:
        env = _copy_environ()
        env.update(
            unretried_requests(self.request_timeout),
            MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT="true",
            MLFLOW_ENABLE_ASYNC_LOGGING="false",
            PYTHONIOENCODING="utf-8",
            PYTHONPATH=os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p),
        )
        return env

    def _ensure_started(self) -> None:
        if self._process is not None and self._process.poll() is None:
            return
        if self._process is not None:
            self.restarts += 1
        self._buffer = b""
        self.ready.clear()
        # Its own session: a Ctrl-C meant for training does not kill delivery; it ends when its input closes.
        self._process = subprocess.Popen(
            [sys.executable, "-c", BOOTSTRAP + "from keras_l2.tracking.worker import main\nmain()\n"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=self.environment(), start_new_session=True,
        )

    def reply_timeout(self, job: dict) -> float:
        """Seconds to wait for the reply to `job`: a start-up allowance plus two requests per record."""
        return 60.0 + 2 * self.request_timeout * (len(job["records"]) + 1)

    def warm(self, store, local: bool) -> None:
        """Starts the process, if it is not ready, and has it open `store`, in the background.

        `local`: a store without HTTP requests, opened here first (a new SQLite store gets its schema
        from this process, which has imported MLflow already, while the delivery process still imports it).
        """
        with self._warm_lock:  # not `_lock`, which a call holds for as long as the process takes to answer
            if self.ready.is_set() or (self._warming is not None and self._warming.is_alive()):
                return
            self._warming = threading.Thread(target=self._warm, args=(store, local), daemon=True,
                                             name="keras_l2-delivery-start")
            self._warming.start()

    def _warm(self, store, local: bool) -> None:
        if local:
            self.deliver(store, {}, [], in_process=True)
        self.deliver(store, {}, [])

    def deliver(self, store, runs: dict, records: list, in_process: bool = False) -> Reply:
        """Delivers `records` (a run's consecutive logs merged into one `log_batch`) to `store`, in order.

        `runs` maps the run keys the records name to their ids, where known. `in_process`: deliver
        from this process (for a local store while the delivery process is still starting).
        """
        items = coalesce(records)
        job = {"job": next(self._jobs), "records": [to_json(r) for r, _ in items],
               "runs": {r.key: runs[r.key] for r, _ in items if r.key in runs},
               "store": {"tracking_uri": store.tracking_uri, "artifact_location": store.artifact_location}}
        try:
            reply = self._in_process(job) if in_process else self.call(job)
        except CourierError as error:
            return Reply(0, {}, [], str(error), 0.0)
        settled = sum(count for _, count in items[:reply["done"]])
        return Reply(settled, reply["runs"], reply["refused"], reply["error"], reply["cpu"])

    def _in_process(self, job: dict) -> dict:
        with self._local_lock:
            if self._local is None:
                from keras_l2.tracking.worker import Deliverer

                self._local = Deliverer()
            return {**self._local.job(job), "cpu": 0.0}  # the caller's thread time counts it

    def call(self, job: dict) -> dict:
        """Sends `job` to the delivery process and returns its reply; raises `CourierError`."""
        with self._lock:
            self._ensure_started()
            process = self._process
            try:
                process.stdin.write(json.dumps(job, allow_nan=True).encode() + b"\n")
                process.stdin.flush()
                line = self._read_line(process, time.monotonic() + self.reply_timeout(job))
                reply = json.loads(line)
            except (OSError, ValueError, CourierError) as error:
                self._kill(process)
                raise CourierError(f"the delivery process {process.pid} failed ({error}); it is restarted") from None
            if reply.get("job") != job["job"]:
                self._kill(process)
                raise CourierError(f"the delivery process answered job {reply.get('job')} for {job['job']}")
            self.ready.set()
            return reply

    def _read_line(self, process, deadline: float) -> bytes:
        fd = process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CourierError("no answer in time")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise CourierError(f"it exited with code {process.wait()}")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def _kill(self, process) -> None:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()


def _copy_environ() -> dict:
    """`dict(os.environ)`, retried: MLflow's telemetry thread pops a variable of its own while we copy."""
    for _ in range(10):
        try:
            return dict(os.environ)
        except KeyError:
            continue
    return dict(os.environ)
