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

    `OUTAGE` and `SPOOLED` are the two messages whose wording depends on what
    the outbox serves (training here; `ResendNotices` for `send_pending`),
    formatted with `uri`, `error`, `retry`, `spool`, `count`, `timeout`,
    `why` and `path`.

    Attributes:
        down: the error while the store is unreachable, else None.
        reported: how many undelivered records the user was last told about.
    """

    OUTAGE = ("keras_l2: cannot reach the MLflow store %(uri)s (%(error)s). Training goes on; every record is kept "
              "in memory and retried every %(retry).0f s, and saved under %(spool)s if it is still undelivered when "
              "training ends.")
    SPOOLED = ("keras_l2: %(count)d MLflow record(s) for %(uri)s could not be delivered within %(timeout).1f s "
               "(%(why)s). They are saved in %(path)s and will be sent when the store is reachable again: by this "
               "process while it runs, by the next MlflowL2Logger that uses this store, or by "
               "`keras_l2.send_pending()`.")

    def __init__(self, tracking_uri: str, spool_dir, retry_interval: float):
        self.tracking_uri, self.spool_dir, self.retry_interval = tracking_uri, spool_dir, retry_interval
        self.down: str | None = None
        self.reported = 0

    def outage(self, error: str) -> bool:
        """Notes a failed delivery; says so if an outage starts (returns whether it did)."""
        starts = self.down is None
        if starts:
            LOG.warning(self.OUTAGE, {"uri": self.tracking_uri, "error": error, "retry": self.retry_interval,
                                      "spool": self.spool_dir})
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
        LOG.warning(self.SPOOLED, {"count": count, "uri": self.tracking_uri, "timeout": timeout,
                                   "why": self.down or "still sending", "path": path})

    def saved_at_exit(self, count: int, path) -> None:
        if count != self.reported:
            LOG.warning("keras_l2: %d undelivered MLflow record(s) for %s saved in %s; `keras_l2.send_pending()` "
                        "sends them.", count, self.tracking_uri, path)


class ResendNotices(Notices):
    """The messages of `send_pending`: no training goes on there, and the records simply stay saved."""

    OUTAGE = "keras_l2: cannot reach the MLflow store %(uri)s (%(error)s); its records stay saved in %(spool)s."
    SPOOLED = ("keras_l2: %(count)d MLflow record(s) for %(uri)s still undelivered after %(timeout).1f s (%(why)s); "
               "they stay saved in %(path)s.")
