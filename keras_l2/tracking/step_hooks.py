"""The logger's step hooks (`log_every_n_steps`), and the guard that keeps tracking errors out of `fit`.

`StepHooks` is a mixin of `MlflowL2Logger`; its batch hooks are methods,
the same for every logger: without `log_every_n_steps` they return at once.
Keras dispatches batch ends on a worker thread (PyTorch, JAX) only if every
callback keeps Keras' default batch-end hooks or is `async_safe`; these are
safe to run that way, so a logger never makes steps wait for the host.

Example:

>>> from keras_l2.tracking.step_hooks import never_raises
>>> class Hooked:
...     _reported_error = False
...     @never_raises
...     def on_epoch_end(self, epoch):
...         raise ValueError("store gone")
>>> Hooked().on_epoch_end(1) is None  # logged once as a warning, never raised
True
"""

from __future__ import annotations

import functools
import logging

from keras_l2 import backend
from keras_l2.tracking.values import STEP_PREFIX, keras_values, norm_metrics

LOG = logging.getLogger("keras_l2")


def never_raises(hook):
    """Tracking must never end a training run: report the error once, go on."""

    @functools.wraps(hook)
    def guarded(self, *args, **kwargs):
        try:
            return hook(self, *args, **kwargs)
        except Exception as error:  # noqa: BLE001
            if not self._reported_error:
                self._reported_error = True
                LOG.warning("keras_l2: MlflowL2Logger.%s failed (%s: %s); training goes on, "
                            "tracking of this step is skipped.", hook.__name__, type(error).__name__, error,
                            exc_info=LOG.isEnabledFor(logging.DEBUG))
            return None

    return guarded


class StepHooks:
    """Logs `step/<name>` every k optimizer steps; on JAX a step's norms when the next step begins."""

    # Keras dispatches batch ends on a worker thread (PyTorch, JAX) only if every
    # callback either keeps Keras' default batch-end hooks or says it is safe to run
    # that way. Ours is: without `log_every_n_steps` it returns at once, with it
    # it only reads numbers and queues them. So a logger never makes steps wait.
    async_safe = True

    def on_epoch_begin(self, epoch, logs=None):
        if self._cadence is not None:
            self._epoch_start_step = self._cadence.highest

    def on_train_batch_end(self, batch, logs=None):
        if self._cadence is not None:
            self._on_step_end(batch, logs)

    def on_train_batch_begin(self, batch, logs=None):
        if self._step_norms_at_begin:
            self._read_step_norms(batch, logs)

    @never_raises
    def _on_step_end(self, batch, logs=None):
        # Possibly on one of Keras' worker threads, possibly out of order.
        if self._run is None:
            return
        step = self._epoch_start_step + batch + 1
        if not self._cadence.take(step):
            return
        values = keras_values(logs or {})
        if not self._step_norms_at_begin:
            # Run asynchronously (PyTorch), the weights read here may be a step newer than `step`.
            live = backend.live_values(self._l2_model, self._kernels)
            values.update(norm_metrics(self._norm_keys, self._norms(live)))
        values["lambda"] = self._current_lambda(self._l2_model)
        self._outbox.log(self._run, metrics={STEP_PREFIX + key: v for key, v in values.items()}, step=step)

    @never_raises
    def _read_step_norms(self, batch, logs=None):
        """JAX: logs the norms of the last step if it is a logged one.

        Between JAX steps the weights live in the trainer's state, which the next
        step donates (deletes): read from Keras' worker thread they may already be
        gone (under DataParallel, a segfault). So the norms of step s are read
        when step s + 1 begins (a synchronous hook, before the donation), and the
        last step's at epoch end.
        """
        if self._run is None:
            return
        self._log_step_norms(self._epoch_start_step + batch)

    def _log_step_norms(self, step: int) -> None:
        if not self._norm_cadence.take(step):
            return
        norms = norm_metrics(self._norm_keys, self._norms(backend.live_values(self._l2_model, self._kernels)))
        self._outbox.log(self._run, metrics={STEP_PREFIX + key: v for key, v in norms.items()}, step=step)
