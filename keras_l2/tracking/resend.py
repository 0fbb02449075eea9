"""Sending what earlier runs left undelivered: `send_pending` (and `keras-l2 send-pending`).

The spool folder may hold records for several stores (a server that was
down, the embedded store of another working directory). `pending_stores`
lists them; `send_pending` sends those of one store, or of every store.

Example:

>>> import tempfile
>>> from keras_l2.tracking.resend import send_pending
>>> with tempfile.TemporaryDirectory() as root:
...     send_pending(f"sqlite:///{root}/mlflow.db", spool_dir=root, timeout=5)
0
"""

from __future__ import annotations

from pathlib import Path

from keras_l2.tracking import spool
from keras_l2.tracking.notices import ResendNotices
from keras_l2.tracking.outbox import SPOOL_DIR, Outbox
from keras_l2.tracking.store import resolve_store


def pending_stores(spool_dir=None) -> dict:
    """{tracking URI: records waiting for it} in the spool folder (default `mlruns/keras_l2_pending/`)."""
    return spool.waiting(Path(spool_dir) if spool_dir is not None else SPOOL_DIR.resolve())


def send_pending(tracking_uri: str | None = None, spool_dir=None, timeout: float = 30.0,
                 report=None) -> int:
    """Delivers records that earlier runs left in the spool; returns how many are still pending.

    Args:
        tracking_uri: the store whose records to send; None: every store that
            has records in the spool.
        spool_dir: where the records were saved (default `mlruns/keras_l2_pending/`).
        timeout: seconds to wait for each store's delivery.
        report: called as `report(uri, sent, left)` after each store (e.g. to print it).
    """
    uris = [tracking_uri] if tracking_uri is not None else list(pending_stores(spool_dir))
    left = 0
    for uri in uris:
        outbox = Outbox(resolve_store(uri), spool_dir=spool_dir, notices=ResendNotices)
        found = outbox.adopt_spool()
        outbox.close(timeout)
        left += outbox.pending()
        if report is not None:
            report(uri, found - outbox.pending(), outbox.pending())
    return left
