"""The run a logger logs into: the active one, a child of it, or its own; ended once, FAILED if the process dies.

With an active MLflow run on the same store the logger logs into it (or, with
`nested=True`, into a new child of it); with `parent_run_id` it starts a child
of that run; otherwise it starts its own. A run it started is ended by
`end`, or marked FAILED by the outbox at process exit if nothing ended it.

Example:

>>> import tempfile
>>> from keras_l2.tracking.lifecycle import TrackedRun
>>> from keras_l2.tracking.outbox import Outbox
>>> from keras_l2.tracking.settings import Settings
>>> from keras_l2.tracking.store import resolve_store
>>> with tempfile.TemporaryDirectory() as root:
...     outbox = Outbox(resolve_store(root=root, honour_user_uri=False))
...     run = TrackedRun(outbox, Settings(run_name="demo"))
...     key = run.start()
...     owned, ended = run.owned, run.end("FINISHED")
...     delivered = outbox.flush(60)
>>> owned, ended, run.owned, delivered
(True, True, False, True)
"""

from __future__ import annotations

import logging

from keras_l2.tracking.outbox import Outbox
from keras_l2.tracking.settings import Settings

LOG = logging.getLogger("keras_l2")


class TrackedRun:
    """The run of one `fit`, through `outbox`.

    Attributes:
        key: the outbox's key of the run (None before `start`).
        owned: whether this object started the run and has not ended it.
    """

    def __init__(self, outbox: Outbox, settings: Settings):
        self.outbox = outbox
        self.settings = settings
        self.key: str | None = None
        self.owned = False

    def start(self) -> str:
        """Picks or creates the run (see the module docstring); returns its key."""
        import mlflow

        settings, store = self.settings, self.outbox.store
        active = None if settings.parent_run_id is not None else mlflow.active_run()
        if active is not None and mlflow.get_tracking_uri() != store.tracking_uri:
            LOG.warning("keras_l2: the active MLflow run %s is on %s, but this logger logs to %s; it "
                        "starts a run of its own there.", active.info.run_id, mlflow.get_tracking_uri(),
                        store.tracking_uri)
            active = None
        if active is not None and not settings.nested:
            self.key = self.outbox.use_run(active.info.run_id)
            self.outbox.log(self.key, tags=settings.tags)
            return self.key
        from mlflow.tracking.context.registry import resolve_tags

        self.key = self.outbox.create_run(
            settings.experiment_name, run_name=settings.run_name, tags=resolve_tags(settings.tags),
            parent_run_id=settings.parent_run_id if active is None else active.info.run_id,
        )
        self.owned = True
        # `fit` may raise and the process exit without anyone ending the run.
        self.outbox.end_at_exit(self.key, "FAILED", wait=settings.max_delay)
        return self.key

    def end(self, status: str) -> bool:
        """Ends the run with `status` if this object started it and it is still open; returns whether it did."""
        if not self.owned:
            return False
        self.outbox.end_run(self.key, status)
        self.owned = False
        return True
