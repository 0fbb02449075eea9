"""The outboxes of this process: what is undelivered when it exits is saved, and never adopted while sent.

Each `Outbox` registers here. At exit every one ends the runs it was asked
to end then (`Outbox.end_at_exit`) and saves what is still undelivered to
its spool file, since its delivery thread dies with the interpreter. A spool
file is adopted only when the outbox that wrote it is gone: its process
exited, or (in this process) it was closed or delivered everything.

Example:

>>> import os
>>> from keras_l2.tracking.pending import still_sending
>>> still_sending({"pid": os.getpid()}, None), still_sending({"pid": 2 ** 22 + 1}, None)
(False, False)
"""

from __future__ import annotations

import atexit
import os
import weakref
from pathlib import Path

from keras_l2.tracking import spool

_OUTBOXES: weakref.WeakSet = weakref.WeakSet()  # weak: an outbox dropped by its owner leaves the set


def register(outbox) -> None:
    _OUTBOXES.add(outbox)


def still_sending(head: dict, path: Path | None) -> bool:
    """Whether the outbox that wrote a spool file (its header `head`) is alive and still delivering it."""
    if head.get("pid") == os.getpid():
        return any(outbox.is_delivering(path) for outbox in list(_OUTBOXES))
    return spool.pid_alive(head.get("pid"))


@atexit.register
def _save_undelivered() -> None:
    for outbox in list(_OUTBOXES):
        outbox.at_exit()
