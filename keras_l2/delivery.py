"""Getting tracking records into MLflow without ever stalling or failing training.

With MLflow's default retry settings one call to an `mlflow server` that has
gone down blocks for minutes and then raises, and its async logging drops
what it could not send. `Outbox` instead:

- takes records (run creation, metrics, params, tags, run end) on the
  training thread without any I/O, and delivers them, in order, from one
  background thread;
- talks to a tracking server with a short request timeout and no hidden
  retries, and retries itself every few seconds while the server is down,
  keeping every record in memory;
- on `flush(timeout)` waits at most `timeout` seconds; what is still
  undelivered is then also written to a spool file (JSON lines) that a later
  `Outbox` on the same store, or `send_pending`, delivers;
- makes redelivery harmless: metrics keep the timestamp they were logged
  with (MLflow stores a metric point once per key, step, timestamp and
  value), and a run that may or may not have been created is looked up by
  its `keras_l2.run_key` tag before it is created again.

It says once per outage what happened and where the records are (the
`keras_l2` logger, which prints to stderr when logging is not configured).

Example:

>>> import tempfile
>>> from keras_l2.delivery import Outbox
>>> from keras_l2.tracking_store import resolve_store
>>> with tempfile.TemporaryDirectory() as root:
...     outbox = Outbox(resolve_store(root=root, honour_user_uri=False))
...     run = outbox.create_run("demo", run_name="first")
...     outbox.log(run, metrics={"loss": 0.5}, step=1)
...     outbox.end_run(run, "FINISHED")
...     delivered = outbox.flush(timeout=30)
...     _ = outbox.close()
>>> delivered
True
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import itertools
import json
import logging
import math
import os
import threading
import time
import uuid
import weakref
from pathlib import Path

from keras_l2.tracking_store import TrackingStore, experiment_id, open_store

LOG = logging.getLogger("keras_l2")
SPOOL_DIR = Path("mlruns") / "keras_l2_pending"
RUN_KEY_TAG = "keras_l2.run_key"
# MLflow's limits for one log-batch request.
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 1000, 100, 100
# Errors a retry cannot fix; everything else (refused connections, timeouts,
# 5xx, a locked SQLite file) is treated as an outage and retried.
_PERMANENT = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_DOES_NOT_EXIST",
    "RESOURCE_ALREADY_EXISTS",
    "INVALID_STATE",
    "BAD_REQUEST",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "ENDPOINT_NOT_FOUND",
}
_LIVE: weakref.WeakSet = weakref.WeakSet()


def _now_ms() -> int:
    return int(time.time() * 1000)


class Outbox:
    """Delivers tracking records to one MLflow store from a background thread.

    Args:
        store: where the records go (see `keras_l2.tracking_store`).
        spool_dir: where records still undelivered at a `flush` timeout or at
            process exit are saved. Defaults to `mlruns/keras_l2_pending/`
            under the working directory.
        request_timeout: seconds one request to a tracking server may take.
        retry_interval: seconds between delivery attempts during an outage.
        min_interval: seconds between two deliveries of metrics, so that
            records logged often go out together (one store call, and less
            time the delivery thread holds Python's GIL while training runs).
            `flush` delivers at once.
    """

    def __init__(
        self,
        store: TrackingStore,
        spool_dir: str | os.PathLike | None = None,
        request_timeout: float = 5.0,
        retry_interval: float = 2.0,
        min_interval: float = 2.0,
    ):
        self.store = store
        self.spool_dir = Path(spool_dir) if spool_dir is not None else SPOOL_DIR.resolve()
        self.request_timeout = float(request_timeout)
        self.retry_interval = float(retry_interval)
        self.min_interval = float(min_interval)
        self._last_delivery = -math.inf
        self._retry_at = -math.inf
        self._flushing = 0
        self.spool_path = self.spool_dir / f"{uuid.uuid4().hex}.jsonl"
        self._ops: collections.deque = collections.deque()
        self._runs: dict[str, str] = {}  # run key -> run id
        self._experiments: dict[str, str] = {}
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._spooled = False
        self._reported = 0  # how many undelivered records the user was last told about
        self._outage: str | None = None  # the error, while the store is unreachable
        self._backend = None
        self.delivered = 0
        self.cpu_seconds = 0.0  # CPU time the delivery thread spent in store calls
        self._thread = None  # runs only while there is something to deliver
        _LIVE.add(self)

    # ----------------------------------------------------------- training side
    def create_run(self, experiment: str, run_name=None, tags=None, parent_run_id=None) -> str:
        """Queues the creation of a run; returns its key for `log`/`end_run`."""
        key = uuid.uuid4().hex
        tags = {str(k): str(v) for k, v in (tags or {}).items()}
        tags[RUN_KEY_TAG] = key
        if parent_run_id is not None:
            tags["mlflow.parentRunId"] = parent_run_id
        self._put({"op": "run", "key": key, "experiment": experiment, "run_name": run_name,
                   "tags": tags, "start_time": _now_ms(), "attempted": False})
        return key

    def use_run(self, run_id: str) -> str:
        """Registers an existing run (e.g. the active one); returns its key."""
        key = uuid.uuid4().hex
        with self._cond:
            self._runs[key] = run_id
        return key

    def run_id(self, key: str, timeout: float = 0.0) -> str | None:
        """The id of run `key`, waiting up to `timeout` s for its creation."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while key not in self._runs and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            return self._runs.get(key)

    def log(self, run: str, metrics=None, step: int = 0, params=None, tags=None) -> None:
        """Queues metrics (at `step`, timestamped now), params and tags of run `run`."""
        stamp = _now_ms()
        points = [[k, float(v), stamp, int(step)] for k, v in (metrics or {}).items()]
        for start in range(0, len(points), _MAX_METRICS):
            self._put({"op": "log", "key": run, "metrics": points[start:start + _MAX_METRICS]})
        # Params go on their own: a rejected one (changed value) must not take
        # metrics down with it.
        for name, items, limit in (("params", params, _MAX_PARAMS), ("tags", tags, _MAX_TAGS)):
            pairs = [[str(k), str(v)] for k, v in (items or {}).items()]
            for start in range(0, len(pairs), limit):
                self._put({"op": "log", "key": run, name: pairs[start:start + limit]})

    def end_run(self, run: str, status: str = "FINISHED") -> None:
        """Queues marking run `run` terminated with `status` (FINISHED, FAILED, KILLED)."""
        self._put({"op": "end", "key": run, "status": status, "end_time": _now_ms()})

    def pending(self) -> int:
        """How many records are not delivered yet."""
        with self._cond:
            return len(self._ops)

    def flush(self, timeout: float) -> bool:
        """Waits up to `timeout` s for delivery; returns whether everything went.

        On a timeout the undelivered records are saved to `spool_path` (and
        stay queued: delivery goes on in the background while the process runs).
        """
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            self._flushing += 1
            self._wake()
            try:
                while (self._ops or self._busy) and time.monotonic() < deadline:
                    self._cond.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            finally:
                self._flushing -= 1
            if not self._ops:
                return True
            self._write_spool()
            self._reported = len(self._ops)
            LOG.warning(
                "keras_l2: %d MLflow record(s) for %s could not be delivered within %.1f s (%s). "
                "They are saved in %s and will be sent when the store is reachable again: by this "
                "process while it runs, by the next MlflowL2Logger that uses this store, or by "
                "`keras_l2.send_pending()`.",
                len(self._ops), self.store.tracking_uri, timeout, self._outage or "still sending",
                self.spool_path,
            )
            return False

    def close(self, timeout: float = 0.0) -> bool:
        """Flushes for up to `timeout` s, saves what is left, stops delivering."""
        delivered = self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        return delivered

    # --------------------------------------------------------------- spooling
    def adopt_spool(self) -> int:
        """Queues the records other outboxes left for this store; returns how many."""
        adopted = 0
        if not self.spool_dir.is_dir():
            return 0
        for path in sorted(self.spool_dir.glob("*.jsonl")):
            if path == self.spool_path:
                continue
            claimed = path.with_suffix(f".claimed-{os.getpid()}-{uuid.uuid4().hex[:6]}")
            try:
                path.rename(claimed)  # atomic: two processes never adopt one file
            except OSError:
                continue
            header, ops = _read_spool(claimed)
            if header.get("tracking_uri") != self.store.tracking_uri or _still_sending(header, path):
                claimed.rename(path)
                continue
            with self._cond:
                self._runs.update(header.get("runs", {}))
                self._ops.extend(ops)
                adopted += len(ops)
                self._write_spool()
                self._wake()
            claimed.unlink()
        return adopted

    def _write_spool(self) -> None:
        """Mirrors the queue into the spool file (caller holds the lock)."""
        if not self._ops:
            if self._spooled:
                with contextlib.suppress(OSError):
                    self.spool_path.unlink()
                self._spooled = False
            return
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        header = {"version": 1, "pid": os.getpid(), "tracking_uri": self.store.tracking_uri,
                  "artifact_location": self.store.artifact_location, "runs": self._runs}
        temporary = self.spool_path.with_suffix(".tmp")
        with open(temporary, "w") as handle:
            handle.write(json.dumps(header) + "\n")
            for op in self._ops:
                # A run being created may or may not exist once we crash.
                op = dict(op, attempted=True) if op["op"] == "run" else op
                handle.write(json.dumps(op, allow_nan=True) + "\n")
        temporary.replace(self.spool_path)
        self._spooled = True

    # --------------------------------------------------------- delivery side
    def _put(self, op: dict) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("This Outbox is closed.")
            self._ops.append(op)
            if self._spooled:
                self._write_spool()
            self._wake()

    def _wake(self) -> None:
        """Starts the delivery thread if it is not running (caller holds the lock)."""
        if self._thread is None and self._ops and not self._closed:
            self._thread = threading.Thread(target=self._work, name="keras_l2-mlflow-outbox", daemon=True)
            self._thread.start()
        self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                if not self._ops or self._closed:
                    self._thread = None
                    self._cond.notify_all()
                    return
                now = time.monotonic()
                paced = self._ops[0]["op"] == "log" and not self._flushing
                not_before = max(self._retry_at, self._last_delivery + self.min_interval if paced else -math.inf)
                if now < not_before:
                    # Let records gather (flush() wakes us), or wait out an outage.
                    self._cond.wait(not_before - now)
                    continue
                batch, count = _coalesce(self._ops)
                self._busy = True
            started = time.thread_time()
            try:
                self._deliver(batch)
                error = None
            except Exception as caught:  # noqa: BLE001 - classified below; must never escape
                error = caught
            self.cpu_seconds += time.thread_time() - started
            with self._cond:
                self._busy = False
                self._last_delivery = time.monotonic()
                if error is None or not _transient(error):
                    for _ in range(count):
                        self._ops.popleft()
                    if error is not None:
                        self._reject(batch, error)
                    else:
                        self.delivered += count
                        if self._outage is not None:
                            LOG.warning("keras_l2: MLflow store %s is reachable again; delivering the "
                                        "buffered records.", self.store.tracking_uri)
                            self._outage = None
                    if self._spooled:
                        self._write_spool()
                    self._cond.notify_all()
                    continue
                if self._outage is None:
                    LOG.warning(
                        "keras_l2: cannot reach the MLflow store %s (%s). Training goes on; every record "
                        "is kept in memory and retried every %.0f s, and saved under %s if it is still "
                        "undelivered when training ends.",
                        self.store.tracking_uri, _short(error), self.retry_interval, self.spool_dir,
                    )
                self._outage = _short(error)
                self._retry_at = time.monotonic() + self.retry_interval
                self._cond.notify_all()

    def _reject(self, batch, error) -> None:
        if batch["op"] == "log" and batch.get("params"):
            LOG.warning("keras_l2: MLflow refused params %s of run %s (%s); they were dropped (the "
                        "run keeps the values logged first).", [k for k, _ in batch["params"]],
                        self._runs.get(batch["key"]), _short(error))
        else:
            LOG.warning("keras_l2: MLflow refused a %r record for run %s: %s. It was dropped.",
                        batch["op"], self._runs.get(batch["key"]), _short(error))

    def _client(self):
        if self._backend is None:
            self._backend = _store_backend(self.store, self.request_timeout)
        return self._backend

    def _deliver(self, batch: dict) -> None:
        from mlflow.entities import Metric, Param, RunStatus, RunTag

        backend = self._client()
        if batch["op"] == "run":
            run_id = self._create_run(backend, batch)
            with self._cond:
                self._runs[batch["key"]] = run_id
            return
        run_id = self._runs.get(batch["key"])
        if run_id is None:
            raise _Unknown(f"run key {batch['key']} was never created")
        if batch["op"] == "end":
            backend.update_run_info(run_id, RunStatus.from_string(batch["status"]), batch["end_time"], None)
            return
        backend.log_batch(
            run_id,
            metrics=[Metric(k, v, t, s) for k, v, t, s in batch.get("metrics", ())],
            params=[Param(k, v) for k, v in batch.get("params", ())],
            tags=[RunTag(k, v) for k, v in batch.get("tags", ())],
        )

    def _create_run(self, backend, op: dict) -> str:
        from mlflow.entities import RunTag, ViewType

        name = op["experiment"]
        if name not in self._experiments:
            self._experiments[name] = experiment_id(backend, name, self.store)
        exp = self._experiments[name]
        if op.get("attempted"):
            found = backend.search_runs([exp], filter_string=f"tags.`{RUN_KEY_TAG}` = '{op['key']}'",
                                        run_view_type=ViewType.ALL, max_results=1)
            if found:
                return found[0].info.run_id
        op["attempted"] = True
        tags = [RunTag(k, v) for k, v in op["tags"].items()]
        user = op["tags"].get("mlflow.user", "unknown")
        run = backend.create_run(exp, user, op["start_time"], tags, op["run_name"])
        return run.info.run_id


class _Unknown(Exception):
    """A record that refers to a run this outbox never saw created."""


def _coalesce(ops) -> tuple[dict, int]:
    """The head record (itself, not a copy), merged with following metric records of its run.

    Returns the record to deliver and how many queued records it stands for.
    """
    head = ops[0]
    if head["op"] != "log" or set(head) != {"op", "key", "metrics"}:
        return head, 1
    metrics, count = list(head["metrics"]), 1
    for op in itertools.islice(ops, 1, None):
        if (op["op"] != "log" or op["key"] != head["key"] or set(op) != {"op", "key", "metrics"}
                or len(metrics) + len(op["metrics"]) > _MAX_METRICS):
            break
        metrics.extend(op["metrics"])
        count += 1
    return dict(head, metrics=metrics), count


def _transient(error: Exception) -> bool:
    if isinstance(error, _Unknown):
        return False
    code = getattr(error, "error_code", None)
    return code not in _PERMANENT


def _short(error: Exception) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) < 200 else text[:200] + "..."


def _store_backend(store: TrackingStore, request_timeout: float):
    """The MLflow tracking store object, with bounded requests for servers."""
    if store.tracking_uri.startswith(("http://", "https://")):
        return _bounded_rest_store(store.tracking_uri, request_timeout)
    return open_store(store)._tracking_client.store


def _bounded_rest_store(uri: str, request_timeout: float):
    from mlflow.store.tracking.rest_store import RestStore
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.proto_json_utils import parse_dict
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    class BoundedRestStore(RestStore):
        """MLflow's REST store, one attempt per request and a short timeout.

        MLflow's own client retries a dead server for about four minutes per
        call (its `MLFLOW_HTTP_REQUEST_*` settings are process-wide, so we do
        not touch them); the outbox does its own retrying.
        """

        def _call_endpoint(self, api, json_body=None, endpoint=None, retry_timeout_seconds=None,
                           response_proto=None):
            table = self._V3_METHOD_TO_INFO if api in self._V3_APIS else self._METHOD_TO_INFO
            default_endpoint, method = table[api]
            endpoint = endpoint or default_endpoint
            response_proto = response_proto or api.Response()
            body = json.loads(json_body) if json_body is not None else None
            payload = {"params": body} if method == "GET" else {"json": body}
            response = http_request(self.get_host_creds(), endpoint, method, max_retries=0,
                                    timeout=request_timeout, **payload)
            response = verify_rest_response(response, endpoint)
            if response.status_code != 204:
                parse_dict(js_dict=json.loads(response.text), message=response_proto)
            return response_proto

    return BoundedRestStore(lambda: get_default_host_creds(uri))


def _still_sending(header: dict, path: Path) -> bool:
    """Whether the outbox that wrote a spool file is alive and still delivering it."""
    pid = header.get("pid")
    if pid == os.getpid():
        return any(o.spool_path == path and o._ops and not o._closed for o in list(_LIVE))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError):
        return pid is not None
    return True


def _read_spool(path: Path) -> tuple[dict, list]:
    lines = path.read_text().splitlines()
    header = json.loads(lines[0]) if lines else {}
    return header, [json.loads(line) for line in lines[1:] if line.strip()]


def send_pending(tracking_uri: str | None = None, spool_dir=None, timeout: float = 30.0) -> int:
    """Delivers records that earlier runs left in the spool; returns how many are still pending.

    Args:
        tracking_uri: the store whose records to send (resolved as
            `MlflowL2Logger` resolves it; the embedded `mlruns/` by default).
        spool_dir: where the records were saved (default `mlruns/keras_l2_pending/`).
        timeout: seconds to wait for delivery.
    """
    from keras_l2.tracking_store import resolve_store

    outbox = Outbox(resolve_store(tracking_uri), spool_dir=spool_dir)
    outbox.adopt_spool()
    outbox.close(timeout)
    return outbox.pending()


@atexit.register
def _save_undelivered() -> None:
    # Daemon threads die with the interpreter: write down what they still had.
    for outbox in list(_LIVE):
        with outbox._cond:
            if outbox._ops:
                outbox._write_spool()
                if len(outbox._ops) != outbox._reported:
                    LOG.warning("keras_l2: %d undelivered MLflow record(s) for %s saved in %s; "
                                "`keras_l2.send_pending()` sends them.", len(outbox._ops),
                                outbox.store.tracking_uri, outbox.spool_path)
