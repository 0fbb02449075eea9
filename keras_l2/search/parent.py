"""The parent run of a sweep or a tune: created and ended through an `Outbox`, so a dead server costs its end at
most `max_delay` seconds and nothing logged is lost (what is not delivered is spooled for `keras-l2 send-pending`).
"""

from __future__ import annotations

from keras_l2.tracking.outbox import Outbox

PARENT_TIMEOUT = 60.0  # seconds to wait for the parent run's id (a busy SQLite store is slow, not down)


def start_parent(config, data, store, run_name: str, tags: dict, params: dict) -> tuple:
    """Creates a sweep's (or tune's) parent run through an `Outbox`: `(outbox, parent, parent_id)`; raises
    RuntimeError, its records spooled, when the store gives no run id within `PARENT_TIMEOUT` seconds."""
    outbox = Outbox(store, spool_dir=config.spool_dir, request_timeout=min(5.0, max(1.0, config.max_delay)))
    parent = outbox.create_run(config.experiment, run_name=run_name,
                               tags={"sweep.data": data.name, "sweep.route": config.route, **tags})
    outbox.log(parent, params=params)
    parent_id = outbox.run_id(parent, timeout=PARENT_TIMEOUT)
    if parent_id is None:
        outbox.close()
        raise RuntimeError(f"The parent run {run_name!r} was not created in {store.tracking_uri} within "
                           f"{PARENT_TIMEOUT:g} s; its records are saved in {outbox.spool_dir}.")
    return outbox, parent, parent_id


def reopen_parent(config, store, parent_id: str) -> tuple:
    """`(outbox, parent)` for a parent run another process created (a study's first worker): to end it here."""
    outbox = Outbox(store, spool_dir=config.spool_dir, request_timeout=min(5.0, max(1.0, config.max_delay)))
    return outbox, outbox.use_run(parent_id)


def end_parent(outbox, parent: str, plots: list, status: str, max_delay: float) -> bool:
    """Attaches the plots and ends the parent run through the outbox: at most `max_delay` s of waiting.

    Returns whether all was delivered; what was not is spooled, plots by their path in `results_dir`, and sent
    later.
    """
    for path in plots:
        outbox.log_artifact(parent, path, artifact_path="plots")
    outbox.end_run(parent, status)
    return outbox.close(max_delay)
