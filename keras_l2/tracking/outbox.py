"""Getting tracking records into MLflow without ever stalling or failing training.

With its default retries, MLflow's client blocks for minutes on a dead server
and then raises; its async logging drops what it could not send. `Outbox`:

- takes records on the training thread without I/O and hands them, in order, to the
  delivery process (`keras_l2.tracking.courier`), which makes short, unretried
  requests through MLflow's public client;
- starts a job at most every `_JOB_GAP_S` (to a server `_SERVER_JOB_GAP_S`), sending all that gathered (a
  run's metrics, params and tags in one `log_batch`); `flush`, `run_id` and a backlog skip the wait;
- keeps every record until it is settled: in an outage it retries every `retry_interval` s; a dead delivery
  process is restarted;
- on `flush(timeout)` waits at most `timeout` s, then also saves what is left
  in a spool file (`keras_l2.tracking.spool`) that a later `Outbox` on the same
  store, or `send_pending`, delivers. Redelivery is harmless: a metric keeps its
  timestamp, and a run that may exist is looked up by its `keras_l2.run_key` tag.

It says once per outage what happened and where the records are (the `keras_l2` logger: stderr by default).

Example:

>>> import tempfile
>>> from keras_l2.tracking.outbox import Outbox
>>> from keras_l2.tracking.store import resolve_store
>>> with tempfile.TemporaryDirectory() as root:
...     outbox = Outbox(resolve_store(root=root, honour_user_uri=False))
...     run = outbox.create_run("demo", run_name="first")
...     outbox.log(run, metrics={"loss": 0.5}, step=1, params={"l2.lambda": 0.1})
...     outbox.end_run(run, "FINISHED")
...     delivered = outbox.flush(timeout=60)
...     _ = outbox.close()
>>> delivered, outbox.pending()
(True, 0)
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import os
import threading
import time
import uuid
from pathlib import Path

from keras_l2.tracking import pending, records, spool
from keras_l2.tracking.courier import Reply, courier_for
from keras_l2.tracking.notices import Notices
from keras_l2.tracking.store import TrackingStore

SPOOL_DIR = Path("mlruns") / "keras_l2_pending"
_RECORDS_PER_JOB = 2000  # the most queued records one job to the delivery process covers
_SPOOL_REWRITE_S = 1.0  # while spooled, the spool follows the queue at most this often
# Least time between job starts unless someone or a backlog waits (to a server 500: a train end logging each step
# sends little at once). A job costs the delivery process ~12 ms CPU, which a small model's training feels, and the
# team server ~17 ms + 0.5 ms a metric (experiments/server_request_cost.py), shared by all workers: ~4% a worker.
_JOB_GAP_S, _SERVER_JOB_GAP_S, _SERVER_BACKLOG = 0.5, 2.0, 500


class Outbox:
    """Delivers tracking records to one MLflow store through the delivery process.

    Args:
        store: where the records go (see `keras_l2.tracking.store`).
        spool_dir: where records still undelivered at a `flush` timeout or at
            process exit are saved. Defaults to `mlruns/keras_l2_pending/`
            under the working directory.
        request_timeout: seconds one request to a tracking server may take.
        retry_interval: seconds between delivery attempts during an outage.
        notices: what says what happened (`Notices` class); its messages are for training by default.
    """

    def __init__(self, store: TrackingStore, spool_dir: str | os.PathLike | None = None,
                 request_timeout: float = 5.0, retry_interval: float = 2.0, notices=Notices):
        self.store = store
        self.spool_dir = Path(spool_dir) if spool_dir is not None else SPOOL_DIR.resolve()
        self.request_timeout = float(request_timeout)
        self.retry_interval = float(retry_interval)
        self._spool = spool.Mirror(self.spool_dir / f"{uuid.uuid4().hex}{spool.SUFFIX}")
        self.delivered = 0
        self.cpu_seconds = 0.0  # CPU time of delivery: this process's delivery thread and the delivery process
        self._courier = courier_for(self.request_timeout)
        self._local = not store.tracking_uri.startswith(("http:", "https:", "databricks"))  # no HTTP requests
        self._records: collections.deque = collections.deque()
        self._runs: dict[str, str] = {}  # run key -> run id
        self._exit_ends: dict[str, tuple[str, float]] = {}  # run key -> (status, wait) to end it with at exit
        self._cond = threading.Condition()
        self._busy = self._closed = False
        self._retry_at = self._next_job_at = 0.0
        self._waiters = 0  # threads in flush/run_id: they skip the pacing
        self._notices = notices(store.tracking_uri, self.spool_dir, self.retry_interval)
        self._thread = None  # runs only while there is something to deliver
        pending.register(self)

    @property
    def spool_path(self) -> Path:
        """This outbox's spool file (it exists only while records wait there)."""
        return self._spool.path

    @property
    def delivery_pid(self) -> int | None:
        """The pid of the delivery process (None until it started)."""
        return self._courier.pid

    def prepare(self) -> None:
        """Starts the delivery process, which imports MLflow (seconds), and opens the store, in the background."""
        self._courier.warm(self.store, self._local)

    def create_run(self, experiment: str, run_name=None, tags=None, parent_run_id=None) -> str:
        """Queues the creation of a run; returns its key for `log`/`end_run`."""
        record = records.new_run(experiment, run_name, tags, parent_run_id)
        self._put(record)
        return record.key

    def use_run(self, run_id: str) -> str:
        """Registers an existing run (e.g. the active one); returns its key."""
        key = uuid.uuid4().hex
        with self._cond:
            self._runs[key] = run_id
        return key

    def run_id(self, key: str, timeout: float = 0.0) -> str | None:
        """The id of run `key`, waiting up to `timeout` s for its creation."""
        deadline = time.monotonic() + timeout
        with self._cond, self._waiting():
            while key not in self._runs and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            return self._runs.get(key)

    def log(self, run: str, metrics=None, step: int = 0, params=None, tags=None) -> None:
        """Queues metrics (at `step`, timestamped now), params and tags of run `run`."""
        for record in records.logs(run, metrics, step, params, tags):
            self._put(record)  # split to MLflow's limits here; delivery merges what fits back together

    def log_artifact(self, run: str, local_path, artifact_path: str | None = None) -> None:
        """Queues uploading the file or directory `local_path` to run `run` (under `artifact_path`).

        The file is read when the record is delivered (the spool keeps its path): keep it until then.
        """
        path = Path(local_path)
        if not path.exists():
            raise FileNotFoundError(f"`local_path` must be an existing file or directory. Received: "
                                    f"local_path={str(local_path)!r}")
        self._put(records.Artifact(run, str(path.resolve()), artifact_path))

    def end_run(self, run: str, status: str = "FINISHED") -> None:
        """Queues marking run `run` terminated with `status` (FINISHED, FAILED, KILLED)."""
        allowed = ("FINISHED", "FAILED", "KILLED")
        if status not in allowed:
            raise ValueError(f"`status` must be one of {allowed}. Received: status={status!r}")
        with self._cond:
            self._exit_ends.pop(run, None)
        self._put(records.EndRun(run, status, records.now_ms()))

    def end_at_exit(self, run: str, status: str = "FAILED", wait: float = 5.0) -> None:
        """Ends run `run` with `status` when this process exits, unless `end_run` ends it first.

        At exit the outbox then waits up to `wait` s for delivery before spooling what is left.
        """
        with self._cond:
            self._exit_ends[run] = (status, float(wait))

    def pending(self) -> int:
        """How many records are not delivered yet."""
        with self._cond:
            return len(self._records)

    def flush(self, timeout: float) -> bool:
        """Waits up to `timeout` s for delivery; returns whether everything went.

        On a timeout the undelivered records are saved to `spool_path` (and
        stay queued: delivery goes on in the background while the process runs).
        """
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond, self._waiting():
            while (self._records or self._busy) and time.monotonic() < deadline:
                self._cond.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            if not self._records:
                return True
            self._write_spool()
            self._notices.spooled(len(self._records), timeout, self.spool_path)
            return False

    def close(self, timeout: float = 0.0) -> bool:
        """Flushes for up to `timeout` s, saves what is left, stops delivering."""
        delivered = self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        return delivered

    def adopt_spool(self) -> int:
        """Queues the records other outboxes left for this store; returns how many."""
        adopted = 0
        for head, found in spool.adopt(self.spool_dir, self.store.tracking_uri, self.spool_path, pending.still_sending):
            with self._cond:
                self._runs.update(head.get("runs", {}))
                self._records.extend(found)
                adopted += len(found)
                self._write_spool()
                self._wake()
        return adopted

    @contextlib.contextmanager
    def _waiting(self):
        """Marks a thread waiting for delivery, which then skips the pacing (caller holds the lock)."""
        self._waiters += 1
        self._wake()
        try:
            yield
        finally:
            self._waiters -= 1

    def _write_spool(self) -> None:
        """Mirrors the queue into the spool file (caller holds the lock)."""
        self._spool.update(spool.header(self.store.tracking_uri, self.store.artifact_location, self._runs),
                           self._records)

    def _put(self, record) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("This Outbox is closed.")
            self._records.append(record)
            self._wake()

    def _wake(self) -> None:
        """Starts the delivery thread if it is not running (caller holds the lock)."""
        if self._thread is None and self._records and not self._closed:
            self._thread = threading.Thread(target=self._work, name="keras_l2-mlflow-outbox", daemon=True)
            self._thread.start()
        self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                if self._spool.due(not self._records, _SPOOL_REWRITE_S):
                    self._write_spool()  # follows the queue; gone once all is delivered
                if not self._records or self._closed:
                    self._thread = None
                    self._cond.notify_all()
                    return
                hurry = self._waiters or len(self._records) >= (_RECORDS_PER_JOB if self._local else _SERVER_BACKLOG)
                start_at = self._retry_at if hurry else max(self._retry_at, self._next_job_at)
                if time.monotonic() < start_at:  # wait out an outage, or let records gather
                    self._cond.wait(start_at - time.monotonic())
                    continue
                self._next_job_at = time.monotonic() + (_JOB_GAP_S if self._local else _SERVER_JOB_GAP_S)
                batch, runs = list(itertools.islice(self._records, _RECORDS_PER_JOB)), dict(self._runs)
                for index, record in enumerate(batch):
                    if isinstance(record, records.CreateRun) and not record.attempted:
                        # Sent: from now on it may exist, even if no answer comes back.
                        self._records[index] = dataclasses.replace(record, attempted=True)
                self._busy = True
            # Until the delivery process is up (it imports MLflow: seconds), a local store is written from
            # here, as a short script's records would otherwise wait for it; a server always waits, as
            # only the delivery process bounds its requests.
            in_process = self._local and not self._courier.ready.is_set()
            if in_process:
                self._courier.warm(self.store, self._local)
            started = time.thread_time()
            reply = self._courier.deliver(self.store, runs, batch, in_process=in_process)
            self.cpu_seconds += time.thread_time() - started + reply.cpu
            with self._cond:
                self._busy = False
                self._settle(reply)

    def _settle(self, reply: Reply) -> None:
        """Drops the records the reply settled, notes run ids, reports refusals and outages (lock held)."""
        for _ in range(reply.settled):
            self._records.popleft()
        self._runs.update(reply.runs)
        self._notices.refused(reply.refused)
        self.delivered += reply.settled - len(reply.refused)
        if reply.error is None:
            self._notices.delivered()
        else:
            self._notices.outage(reply.error)
            self._retry_at = time.monotonic() + self.retry_interval
        self._cond.notify_all()

    def is_delivering(self, path: Path) -> bool:
        """Whether this outbox still delivers the records of spool file `path`."""
        with self._cond:
            return path == self.spool_path and bool(self._records) and not self._closed

    def at_exit(self) -> None:
        """Ends the runs registered with `end_at_exit`, then saves what is still undelivered."""
        with self._cond:
            ends, self._exit_ends = dict(self._exit_ends), {}
        for run, (status, _) in ends.items():
            self._put(records.EndRun(run, status, records.now_ms()))
        if ends:
            self.flush(max(wait for _, wait in ends.values()))
        with self._cond:
            self._closed = True  # the delivery thread dies with the interpreter: no spool writes from it
            if self._records:
                self._write_spool()
                self._notices.saved_at_exit(len(self._records), self.spool_path)
