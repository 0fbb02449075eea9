"""The delivery process: runs records against MLflow's public client, one job at a time.

Started by `keras_l2.tracking.courier` as `python -m keras_l2.tracking.worker`
with MLflow's documented HTTP settings (`MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`,
`MLFLOW_HTTP_REQUEST_TIMEOUT`, ...) in its own environment only, so that a
dead server costs one short request, never MLflow's minutes of retries, and
the user's own MLflow calls keep their settings. It imports neither Keras
nor TensorFlow, and its store calls never hold the training process's GIL.

Protocol, one JSON object per line. In: `{"job": n, "store": {...},
"runs": {key: run_id}, "records": [...]}`. Out: `{"job": n, "done": k,
"runs": {key: run_id}, "refused": [...], "error": null | text, "cpu": s}`:
the first `k` records are settled (delivered, or refused for good and
listed in `refused`); `error` is the outage that stopped record `k`, to be
retried. The process ends when its input closes (its parent exited).

Example (the process's loop, run in this process on an in-memory pipe):

>>> import io, json, tempfile
>>> from keras_l2.tracking import worker
>>> with tempfile.TemporaryDirectory() as root:
...     job = {"job": 1, "store": {"tracking_uri": f"sqlite:///{root}/m.db"}, "runs": {}, "records": [
...         {"op": "run", "key": "k", "experiment": "demo", "run_name": "r", "tags": [], "start_time": 1},
...         {"op": "log", "key": "k", "metrics": [["loss", 0.5, 1, 1]]}]}
...     replies = io.StringIO()
...     worker.serve(io.StringIO(json.dumps(job) + "\\n"), replies)
...     reply = json.loads(replies.getvalue())
>>> reply["done"], reply["error"], list(reply["runs"])
(2, None, ['k'])
"""

from __future__ import annotations

import json
import os
import sys
import time

from keras_l2.tracking.records import RUN_KEY_TAG, Artifact, CreateRun, EndRun, Log, from_json
from keras_l2.tracking.store import TrackingStore, experiment_id, open_store

# Errors a retry cannot fix; everything else (refused connections, timeouts,
# 5xx, a locked SQLite file) is an outage, and retried.
PERMANENT = frozenset({
    "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE",
    "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED", "ENDPOINT_NOT_FOUND",
})


class Refused(Exception):
    """A record the store will never take (or that names a run never created)."""


class Deliverer:
    """Delivers records to MLflow stores through `mlflow.MlflowClient`, caching clients and experiment ids."""

    def __init__(self):
        self._clients: dict[str, object] = {}
        self._experiments: dict[tuple[str, str], str] = {}

    def job(self, job: dict) -> dict:
        store = TrackingStore(job["store"]["tracking_uri"], job["store"].get("artifact_location"))
        runs = dict(job.get("runs", {}))
        created, refused, error, done = {}, [], None, 0
        started = time.thread_time()
        try:
            self._client(store)  # the first job opens the store (a new SQLite one gets its schema)
        except Exception as caught:  # noqa: BLE001 - an outage like any other
            return {"job": job["job"], "done": 0, "runs": {}, "refused": [], "error": short(caught),
                    "cpu": time.thread_time() - started}
        for data in job["records"]:
            record = from_json(data)
            try:
                run_id = self._deliver(store, runs, record)
            except Exception as caught:  # noqa: BLE001 - classified here; the loop must go on
                if not permanent(caught):
                    error = short(caught)
                    break
                refused.append({"op": data["op"], "key": record.key, "run_id": runs.get(record.key),
                                "error": short(caught)})
            else:
                if run_id is not None:
                    runs[record.key] = created[record.key] = run_id
            done += 1
        return {"job": job["job"], "done": done, "runs": created, "refused": refused, "error": error,
                "cpu": time.thread_time() - started}

    def _client(self, store: TrackingStore):
        if store.tracking_uri not in self._clients:
            self._clients[store.tracking_uri] = open_store(store)
        return self._clients[store.tracking_uri]

    def _deliver(self, store, runs: dict, record) -> str | None:
        client = self._client(store)
        if isinstance(record, CreateRun):
            return self._create_run(client, store, record)
        run_id = runs.get(record.key)
        if run_id is None:
            raise Refused(f"run key {record.key} was never created")
        if isinstance(record, Log):
            self._log(client, run_id, record)
        elif isinstance(record, EndRun):
            client.set_terminated(run_id, record.status, record.end_time)
        elif isinstance(record, Artifact):
            if not os.path.exists(record.local_path):
                raise Refused(f"artifact {record.local_path!r} no longer exists")
            client.log_artifact(run_id, record.local_path, record.artifact_path)
        return None

    def _log(self, client, run_id: str, record: Log) -> None:
        from mlflow.entities import Metric, Param, RunTag

        metrics = [Metric(k, v, t, s) for k, v, t, s in record.metrics]
        tags = [RunTag(k, v) for k, v in record.tags]
        params = [Param(k, v) for k, v in record.params]
        try:
            client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
        except Exception as error:
            if not (params and (metrics or tags) and permanent(error)):
                raise
            # A refused param (a changed value) must not take metrics down with it.
            client.log_batch(run_id, metrics=metrics, tags=tags)
            try:
                client.log_batch(run_id, params=params)
            except Exception as refused:
                if not permanent(refused):
                    raise
                raise Refused(f"params {[p.key for p in params]} refused ({short(refused)}); "
                              "the run keeps the values logged first") from None

    def _create_run(self, client, store: TrackingStore, record: CreateRun) -> str:
        from mlflow.entities import ViewType

        cache = (store.tracking_uri, record.experiment)
        if cache not in self._experiments:
            self._experiments[cache] = experiment_id(client, record.experiment, store)
        experiment = self._experiments[cache]
        if record.attempted:
            found = client.search_runs([experiment], filter_string=f"tags.`{RUN_KEY_TAG}` = '{record.key}'",
                                       run_view_type=ViewType.ALL, max_results=1)
            if found:
                return found[0].info.run_id
        run = client.create_run(experiment, start_time=record.start_time, tags=dict(record.tags),
                                run_name=record.run_name)
        return run.info.run_id


def permanent(error: Exception) -> bool:
    return isinstance(error, Refused) or getattr(error, "error_code", None) in PERMANENT


def short(error: Exception) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) < 200 else text[:200] + "..."


def serve(requests, replies) -> None:
    """Answers each job line read from `requests` with one line on `replies`, until `requests` ends."""
    deliverer = Deliverer()
    for line in requests:
        if line.strip():
            replies.write(json.dumps(deliverer.job(json.loads(line)), allow_nan=True) + "\n")
            replies.flush()


def main() -> None:
    # The replies get file descriptor 1 to themselves: anything MLflow prints goes to stderr.
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    serve(sys.stdin, replies)


if __name__ == "__main__":
    main()
