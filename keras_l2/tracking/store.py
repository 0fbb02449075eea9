"""Where MLflow runs go: the user's tracking URI, or an embedded SQLite store.

Resolution order:

1. a `tracking_uri` passed explicitly;
2. one the user set (`MLFLOW_TRACKING_URI` or `mlflow.set_tracking_uri`), as is:
   another SQLite file, or `http://host:port` of an `mlflow server` for a team;
3. else the embedded default: a SQLite store at `mlruns/mlflow.db` with
   artifacts under `mlruns/artifacts/`, relative to the working directory.
   (MLflow 3's plain `./mlruns` file store is deprecated and refuses to work
   without an opt-in flag.)

Several processes that open a brand-new SQLite store at the same moment race
on MLflow's schema migration and can leave it unusable (seen with MLflow
3.17.2), so `open_store` creates the schema once, under a file lock.

Example:

>>> import tempfile, os
>>> from keras_l2.tracking.store import resolve_store
>>> with tempfile.TemporaryDirectory() as root:
...     store = resolve_store(root=root, honour_user_uri=False)
...     store.embedded, store.tracking_uri.endswith(os.path.join("mlruns", "mlflow.db"))
(True, True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_DIR = "mlruns"
DATABASE = "mlflow.db"
ARTIFACTS = "artifacts"
_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "file")


@dataclasses.dataclass(frozen=True)
class TrackingStore:
    """A resolved MLflow store.

    Attributes:
        tracking_uri: the URI to hand to `mlflow.MlflowClient`.
        artifact_location: where experiments created here keep artifacts
            (set for the embedded store; None means the server's default).
        embedded: whether this is the embedded default under `mlruns/`.
    """

    tracking_uri: str
    artifact_location: str | None = None
    embedded: bool = False


def check_tracking_uri(uri: object) -> str:
    """Returns `uri` after checking that MLflow can use it; raises ValueError otherwise."""
    allowed = (
        "Allowed: sqlite:///path/to/file.db, http(s)://host:port of an `mlflow server`, "
        "or a database URI such as postgresql://user@host/db"
    )
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"Malformed MLflow tracking URI. Received: tracking_uri={uri!r}. {allowed}")
    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+")[0]
    if scheme not in _SCHEMES:
        raise ValueError(
            f"Unsupported MLflow tracking URI scheme {parsed.scheme!r}. Received: tracking_uri={uri!r}. {allowed}"
        )
    if scheme == "sqlite" and (not uri.startswith("sqlite:///") or uri == "sqlite:///"):
        raise ValueError(f"A SQLite tracking URI needs a file path. Received: tracking_uri={uri!r}. {allowed}")
    if scheme in ("http", "https"):
        try:
            parsed.port  # noqa: B018 - raises ValueError for a port that is not a number in range
        except ValueError:
            raise ValueError(f"Bad port in tracking URI. Received: tracking_uri={uri!r}. {allowed}") from None
        if not parsed.hostname:
            raise ValueError(f"An HTTP tracking URI needs a host. Received: tracking_uri={uri!r}. {allowed}")
    return uri


def unretried_requests(timeout: float) -> dict:
    """MLflow's documented HTTP settings for one try per request, of at most `timeout` s (whole seconds).

    By default MLflow's client retries with backoff for minutes on a dead
    server; keras_l2 retries on its own terms (the outbox), so every request
    it makes goes out once. The delivery process runs with these in its
    environment; `short_requests` sets them around a few calls in this one.
    """
    return {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(timeout))),
        "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": "false",
    }


@contextlib.contextmanager
def short_requests(timeout: float):
    """MLflow client calls inside make one try of at most `timeout` s (see `unretried_requests`)."""
    values = unretried_requests(timeout)
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def resolve_store(tracking_uri: str | None = None, root: str | os.PathLike = ".", honour_user_uri: bool = True):
    """Returns the `TrackingStore` to log to (see the module docstring for the order).

    Args:
        tracking_uri: an explicit URI; wins over everything else.
        root: the directory under which the embedded `mlruns/` lives.
        honour_user_uri: whether a URI set through `MLFLOW_TRACKING_URI` or
            `mlflow.set_tracking_uri` is used (True) or ignored.

    Raises:
        ValueError: a malformed URI, or an `mlruns/` that cannot be created or
            written; raised before any training starts.
    """
    if tracking_uri is None and honour_user_uri:
        import mlflow

        if mlflow.is_tracking_uri_set():
            tracking_uri = mlflow.get_tracking_uri()
    if tracking_uri is not None:
        return TrackingStore(check_tracking_uri(tracking_uri))
    directory = Path(root).resolve() / DEFAULT_DIR
    try:
        (directory / ARTIFACTS).mkdir(parents=True, exist_ok=True)
        probe = directory / ".keras_l2_write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ValueError(
            f"The embedded MLflow store needs a writable directory {str(directory)!r} "
            f"({error.strerror or error}). Run from a writable working directory, or set "
            "MLFLOW_TRACKING_URI (e.g. sqlite:////tmp/mlflow.db or http://127.0.0.1:5000)."
        ) from None
    return TrackingStore(
        tracking_uri=f"sqlite:///{directory / DATABASE}",
        artifact_location=(directory / ARTIFACTS).as_uri(),
        embedded=True,
    )


def ui_page(run_id: str | None = None, experiment_id: str | None = None) -> str:
    """The MLflow UI's page (after the host) of an experiment's runs, else of one run.

    MLflow 3's UI opens in its GenAI view; `workflowType=machine_learning` opens
    the model-training one, where a parent run's + lists its child runs.
    """
    if experiment_id is not None:
        return f"/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    return f"/#/runs/{run_id}" if run_id else "/"


def ui_hint(store: TrackingStore, run_id: str | None, experiment_id: str | None = None) -> str:
    """How to look at run `run_id` (or at experiment `experiment_id`'s runs) from where the user is.

    On a server, the page's URL; else the command that serves the store, then
    the page. `make ui` only where it works: the working directory holds this
    repository's Makefile and the store is its embedded one.
    """
    page = ui_page(run_id, experiment_id)
    if store.tracking_uri.startswith(("http://", "https://")):
        return f"Open {store.tracking_uri.rstrip('/')}{page}"
    if not store.tracking_uri.startswith("sqlite:///"):
        return f"Open the MLflow UI of {store.tracking_uri}."
    then = f", then http://127.0.0.1:5000{page}"
    makefile = Path("Makefile")
    if store.embedded and Path(store.tracking_uri[len("sqlite:///"):]) == (Path.cwd() / DEFAULT_DIR / DATABASE) \
            and makefile.is_file() and "\nui:" in makefile.read_text(errors="replace"):
        return f"Open the MLflow UI: make ui{then}"
    return f"Open the MLflow UI: mlflow ui --backend-store-uri {store.tracking_uri}{then}"


def open_store(store: TrackingStore):
    """Returns an `mlflow.MlflowClient` for `store`, creating a SQLite schema once.

    For SQLite stores the first opening (which runs MLflow's migrations) happens
    under an exclusive lock on `<db>.lock`, so concurrent processes never race
    on a brand-new store.
    """
    import mlflow

    if store.tracking_uri.startswith("sqlite:///"):
        database = Path(store.tracking_uri[len("sqlite:///"):])
        database.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(database.with_name(database.name + ".lock")):
            client = mlflow.MlflowClient(tracking_uri=store.tracking_uri)
            client.search_experiments(max_results=1)  # runs the migrations, if any
        return client
    return mlflow.MlflowClient(tracking_uri=store.tracking_uri)


PROBE_TIMEOUT = 5.0  # seconds a tracking server gets to answer a short question (is it up, a UI link)


def check_reachable(store: TrackingStore, timeout: float = PROBE_TIMEOUT) -> None:
    """Opens the store (a new SQLite store is created once, before any worker opens it); a server must answer
    within `timeout` seconds and accept the credentials (MLFLOW_TRACKING_USERNAME/PASSWORD), else a ValueError."""
    if not store.tracking_uri.startswith(("http://", "https://")):
        open_store(store)
        return
    with short_requests(timeout):
        try:
            open_store(store).search_experiments(max_results=1)
        except Exception as error:  # noqa: BLE001 - any failure to answer means the same to the user
            reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
            if "error code 401" in reason or "error code 403" in reason:
                raise ValueError(f"--tracking-uri: the MLflow server {store.tracking_uri} refused the credentials "
                                 f"(HTTP {'401' if '401' in reason else '403'}): set MLFLOW_TRACKING_USERNAME and "
                                 "MLFLOW_TRACKING_PASSWORD to a user of that server. No run was created.") from None
            raise ValueError(f"--tracking-uri: the MLflow server {store.tracking_uri} does not answer ({reason}); "
                             "start it, or pass another tracking URI. No run was created.") from None


# MLflow's mark of a model-training experiment, set on the experiments keras_l2 creates (one that exists is left
# as is). MLflow 3.17's UI still opens in its GenAI view whatever the tag says (checked in Chromium): the link
# `ui_page` builds, with `workflowType=machine_learning`, is what opens the runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(client, name: str, store: TrackingStore) -> str:
    """Returns the id of experiment `name` (`client`: an `mlflow.MlflowClient`), creating it if needed.

    A new experiment gets the store's artifact location and `EXPERIMENT_KIND`.
    """
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=store.artifact_location, tags=EXPERIMENT_KIND)
    except Exception:  # another process created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


class exclusive_lock:
    """`with exclusive_lock(path):` holds an exclusive `flock` on file `path` (created if missing): one process
    of this machine at a time."""

    def __init__(self, path: Path):
        self._path = path

    def __enter__(self):
        import fcntl

        self._file = open(self._path, "a")  # noqa: SIM115 - held until __exit__
        fcntl.flock(self._file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        import fcntl

        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        return False
