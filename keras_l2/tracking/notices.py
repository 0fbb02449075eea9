"""What the user is told about delivery: once per outage, where the records are, what was refused.

Messages go to the `keras_l2` logger, which prints to stderr when logging is
not configured. An outage is reported when it starts and when it ends, not
at every retry.

Example:

>>> import logging
>>> from keras_l2.tracking.notices import Notices
>>> notices = Notices("http://127.0.0.1:5000", "mlruns/keras_l2_pending", retry_interval=2.0)
>>> logging.disable(logging.WARNING)
>>> notices.outage("ConnectionError: refused"), notices.outage("ConnectionError: refused"), notices.delivered()
(True, False, True)
>>> logging.disable(logging.NOTSET)
"""

from __future__ import annotations

import logging

LOG = logging.getLogger("keras_l2")


class Notices:
    """The messages of one outbox, and what it last said.

    Attributes:
        down: the error while the store is unreachable, else None.
        reported: how many undelivered records the user was last told about.
    """

    def __init__(self, tracking_uri: str, spool_dir, retry_interval: float):
        self.tracking_uri, self.spool_dir, self.retry_interval = tracking_uri, spool_dir, retry_interval
        self.down: str | None = None
        self.reported = 0

    def outage(self, error: str) -> bool:
        """Notes a failed delivery; says so if an outage starts (returns whether it did)."""
        starts = self.down is None
        if starts:
            LOG.warning("keras_l2: cannot reach the MLflow store %s (%s). Training goes on; every record is kept "
                        "in memory and retried every %.0f s, and saved under %s if it is still undelivered when "
                        "training ends.", self.tracking_uri, error, self.retry_interval, self.spool_dir)
        self.down = error
        return starts

    def delivered(self) -> bool:
        """Notes a delivery; says so if it ends an outage (returns whether it did)."""
        ends = self.down is not None
        if ends:
            LOG.warning("keras_l2: MLflow store %s is reachable again; delivering the buffered records.",
                        self.tracking_uri)
        self.down = None
        return ends

    def refused(self, refusals) -> None:
        for refused in refusals:
            LOG.warning("keras_l2: MLflow refused a %r record for run %s: %s. It was dropped.",
                        refused["op"], refused["run_id"], refused["error"])

    def spooled(self, count: int, timeout: float, path) -> None:
        """Says that `count` records missed a `timeout` s flush and are saved in `path`."""
        self.reported = count
        LOG.warning("keras_l2: %d MLflow record(s) for %s could not be delivered within %.1f s (%s). They are "
                    "saved in %s and will be sent when the store is reachable again: by this process while it "
                    "runs, by the next MlflowL2Logger that uses this store, or by `keras_l2.send_pending()`.",
                    count, self.tracking_uri, timeout, self.down or "still sending", path)

    def saved_at_exit(self, count: int, path) -> None:
        if count != self.reported:
            LOG.warning("keras_l2: %d undelivered MLflow record(s) for %s saved in %s; `keras_l2.send_pending()` "
                        "sends them.", count, self.tracking_uri, path)


class ResendNotices(Notices):
    """The messages of `send_pending`: no training goes on there, and the records simply stay saved."""

    def outage(self, error: str) -> bool:
        starts = self.down is None
        if starts:
            LOG.warning("keras_l2: cannot reach the MLflow store %s (%s); its records stay saved in %s.",
                        self.tracking_uri, error, self.spool_dir)
        self.down = error
        return starts

    def spooled(self, count: int, timeout: float, path) -> None:
        self.reported = count
        LOG.warning("keras_l2: %d MLflow record(s) for %s still undelivered after %.1f s (%s); they stay saved "
                    "in %s.", count, self.tracking_uri, timeout, self.down or "still sending", path)
