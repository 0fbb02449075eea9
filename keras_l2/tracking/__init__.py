"""Tracking in MLflow: the `MlflowL2Logger` callback and the delivery behind it.

Names are imported on first use (PEP 562), so that the delivery process,
which imports `keras_l2.tracking.worker`, never imports Keras or TensorFlow.

- `callback`: `MlflowL2Logger`, the Keras callback;
- `outbox`: `Outbox` (queue and delivery); `resend`: `send_pending`;
- `worker` / `courier`: the delivery process and its parent side;
- `records`, `spool`: what is delivered, and how it is saved meanwhile;
- `store`: `resolve_store` (which MLflow store) and the SQLite schema lock;
- `names`, `values`, `settings`, `lifecycle`, `cadence`, `norms`: the callback's parts.

Example:

>>> import sys, keras_l2.tracking
>>> keras_l2.tracking.resolve_store("sqlite:////tmp/x.db").tracking_uri
'sqlite:////tmp/x.db'
"""

from __future__ import annotations

from keras_l2 import _lazy

_EXPORTS = {
    "MlflowL2Logger": "keras_l2.tracking.callback",
    "Outbox": "keras_l2.tracking.outbox",
    "send_pending": "keras_l2.tracking.resend",
    "resolve_store": "keras_l2.tracking.store",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS)
