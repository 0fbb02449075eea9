"""The database of a shared sweep's Optuna study: opened with heartbeats and retries, and the study's lock.

Free of Keras: the command line opens the storage (a wrong URL, a database
that does not answer) before it imports Keras, so a bad one is refused in
seconds. `keras_l2.search.study` runs the workers.

Example:

>>> import tempfile
>>> from keras_l2.search import SweepConfig
>>> from keras_l2.search.study_storage import open_study_storage, study_lock
>>> with tempfile.TemporaryDirectory() as root:
...     config = SweepConfig(study="demo", storage=f"sqlite:///{root}/optuna.db")
...     storage = open_study_storage(config)
...     with study_lock(config):
...         pass
...     storage.engine.dispose()
>>> storage.heartbeat_interval, storage.grace_period
(20, 60)
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from pathlib import Path

from keras_l2.search.config import SweepConfig, mask_url
from keras_l2.tracking.store import exclusive_lock

MAX_RETRY = 3  # a (λ, seed) whose workers die this many times in a row is given up (its trials stay FAIL)


def open_study_storage(config: SweepConfig):
    """Optuna's `RDBStorage` for `config.storage`, with heartbeats and retries; a ValueError if it cannot open."""
    beat = max(1, round(config.heartbeat))
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")  # we send our own
        # Workers that start together would each create Optuna's tables (one fails on the other's): one at a time.
        with database_lock(config.storage, "tables"):
            return optuna.storages.RDBStorage(
                config.storage, heartbeat_interval=beat, grace_period=3 * beat,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
                engine_kwargs={"pool_pre_ping": True})
    except ImportError:
        raise ValueError(f"--storage: {mask_url(config.storage)} needs its database driver (and Optuna): "
                         "pip install 'keras_l2[team]'. No run or trial was created.") from None
    except Exception as error:  # noqa: BLE001 - a driver's, SQLAlchemy's or Optuna's: the same to the user
        raise ValueError(f"--storage: cannot open {mask_url(config.storage)} ({_reason(error, config.storage)}). "
                         "No run or trial was created.") from None


def study_lock(config: SweepConfig):
    """`with study_lock(config):` one worker of the study at a time (its set-up, taking trials, the report)."""
    return database_lock(config.storage, f"study {config.study}")


@contextlib.contextmanager
def database_lock(url: str, name: str):
    """An exclusive lock named `name` among the users of database `url`: a PostgreSQL advisory lock (held by its
    own connection, released if the holder dies), or a file lock beside a SQLite database (one machine)."""
    key = _key(name)
    if url.startswith("sqlite"):
        database = Path(url.split(":///", 1)[1])
        database.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(database.with_name(f"{database.name}.{key}.lock")):
            yield
        return
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
    finally:
        engine.dispose()


def _key(name: str) -> int:
    """A stable signed 64-bit number for a lock's name (PostgreSQL's advisory locks take a bigint)."""
    return int.from_bytes(hashlib.sha256(f"keras_l2 {name}".encode()).digest()[:8], "big", signed=True)


def _reason(error: Exception, url: str) -> str:
    text = (str(error).splitlines() or [type(error).__name__])[0][:300]
    password = url.partition("://")[2].rpartition("@")[0].partition(":")[2]
    return text.replace(password, "***") if password else text
