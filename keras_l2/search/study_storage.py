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


@contextlib.contextmanager
def study_lock(config: SweepConfig):
    """One worker of the study at a time: a PostgreSQL advisory lock, or a file lock beside a SQLite database."""
    if config.storage.startswith("sqlite"):
        database = Path(config.storage.split(":///", 1)[1])
        with exclusive_lock(database.with_name(f"{database.name}.{_key(config.study)}.lock")):
            yield
        return
    import sqlalchemy

    engine = sqlalchemy.create_engine(config.storage, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": _key(config.study)})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": _key(config.study)})
    finally:
        engine.dispose()


def _key(name: str) -> int:
    """A stable signed 64-bit number for the study's name (PostgreSQL's advisory locks take a bigint)."""
    return int.from_bytes(hashlib.sha256(f"keras_l2 study {name}".encode()).digest()[:8], "big", signed=True)


def _reason(error: Exception, url: str) -> str:
    text = (str(error).splitlines() or [type(error).__name__])[0][:300]
    password = url.partition("://")[2].rpartition("@")[0].partition(":")[2]
    return text.replace(password, "***") if password else text
