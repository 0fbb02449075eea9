"""`MlflowL2Logger`: what lambda did to every layer, per epoch, in MLflow."""

from __future__ import annotations

import logging

import keras

from keras_l2 import backend
from keras_l2.inventory import describe, l2_routes, optimizer_chain
from keras_l2.metrics import attach_l2_metrics, detach_l2_metrics
from keras_l2.tracking.cadence import Cadence
from keras_l2.tracking.lifecycle import TrackedRun
from keras_l2.tracking.norms import reader_for
from keras_l2.tracking.outbox import Outbox
from keras_l2.tracking.settings import Settings
from keras_l2.tracking.step_hooks import StepHooks, never_raises
from keras_l2.tracking.store import resolve_store, ui_hint
from keras_l2.tracking.values import (
    DenseKernels,
    description_params,
    fit_params,
    keras_values,
    norm_metrics,
)

LOG = logging.getLogger("keras_l2")


class MlflowL2Logger(StepHooks, keras.callbacks.Callback):
    """Logs lambda, the penalty, the data loss and every Dense kernel's norm to MLflow.

    Works with every keras_l2 route (regularizer, loss, optimizer in either
    mode), found on the model when training starts. Logged:

    - params at train start: `l2.lambda`, `l2.n`, `l2.route`
      (regularizer | loss | optimizer | none), `l2.mode` (penalty | coupled |
      decoupled | none), `l2.layers`, the optimizer's class and config
      (`optimizer.*`), `model.params` and `model.trainable_params`;
    - tags: `l2.regularized/<layer>` = true/false for every Dense layer;
    - metrics every epoch, at step = epochs completed: every Keras log
      (`loss`, `val_loss`, accuracy, ...), `lambda` (the lambda used in that
      epoch), `l2_penalty`, `data_loss`, `regularized_loss` (= data_loss +
      l2_penalty), `val_l2_penalty`, `val_data_loss` (the validation loss
      without the penalty, comparable across lambdas), and
      `weight_norm/<layer>`, the Frobenius norm of every Dense kernel, chosen
      or not. Step 0 (`initial_epoch` when resuming) holds the starting norms and lambda;
    - with `log_every_n_steps=k`, also every k optimizer steps, at step =
      the global step, under `step/<name>`: Keras' running epoch averages,
      `step/lambda` and `step/weight_norm/<layer>`. On PyTorch and JAX these
      are logged from Keras' asynchronous batch-end dispatch when every
      callback allows it (steps then never wait for the host); on PyTorch
      the norms may then be those of the next step's weights. On JAX the
      norms of step s are read when step s + 1 begins (each step donates
      the previous weights), so they are exact and the host waits for the
      device only on logged steps. On TensorFlow Keras runs batch ends
      synchronously.

    `l2_penalty` and `data_loss` are Keras metrics averaged in the compiled
    step exactly like `loss` (see `keras_l2.metrics`), so for the regularizer
    and loss routes `loss == data_loss + l2_penalty`; for the optimizer route
    Keras' `loss` is the data loss and the penalty is reported beside it.
    Norms are computed on the device; numbers move to the host once per
    logging step.

    Where: an explicit `tracking_uri`, else the user's (`MLFLOW_TRACKING_URI`
    or `mlflow.set_tracking_uri`), else the embedded SQLite store
    `mlruns/mlflow.db` (artifacts in `mlruns/artifacts/`).

    Multi-worker: under `tf.distribute.MultiWorkerMirroredStrategy` only the
    chief worker logs (one run, every record once); on the other workers the
    logger adds the same metrics to the step (the workers must run the same
    step) but logs nothing, and its `run_id` is None.

    Runs: with an active MLflow run on the same store, logs into it (or, with
    `nested=True`, into a new child run of it); otherwise starts its own run
    and ends it when training ends (FINISHED). If `fit` raises, a run it
    started is marked FAILED on leaving a `with MlflowL2Logger(...)` block,
    at the logger's next `fit`, or at interpreter exit, whichever is first.

    The tracking store never stalls or fails training: records are sent by a
    delivery process; while the store is unreachable they are kept and
    retried; at train end the logger waits at most `max_delay` seconds, then
    saves what is left under `mlruns/keras_l2_pending/` and sends it later
    (see `keras_l2.tracking.outbox`). Errors inside the logger are reported
    once and never raised out of `fit`; bad arguments are refused here.

    Args:
        tracking_uri: the MLflow store; see above.
        experiment_name: the experiment of runs this logger starts.
        run_name: the name of a run this logger starts.
        nested: with an active run, start a child run under it (one per fit).
        parent_run_id: start a child run under this run (one per fit), active
            or not: what a sweep's worker processes use.
        tags: tags for the run (keys are sanitized like metric keys).
        log_every_n_steps: also log every this many optimizer steps (None: per epoch only).
        log_params: whether to log the params listed above.
        max_delay: the most seconds training waits on tracking at train end.
        spool_dir: where undelivered records are saved.
        verbose: 1 prints where the run is at train start and end.

    Example:

    >>> import keras, numpy as np, tempfile, os
    >>> from keras_l2 import MlflowL2Logger, regularize
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    >>> _ = regularize(model, l2=1e-2)
    >>> model.compile(optimizer="sgd", loss="categorical_crossentropy")
    >>> with tempfile.TemporaryDirectory() as root:
    ...     logger = MlflowL2Logger(tracking_uri=f"sqlite:///{root}/mlflow.db", verbose=0)
    ...     _ = model.fit(np.ones((8, 4)), np.eye(3)[[0, 1, 2, 0, 1, 2, 0, 1]], epochs=2,
    ...                   callbacks=[logger], verbose=0)
    ...     run = logger.client().get_run(logger.run_id)
    >>> run.info.status, run.data.params["l2.route"], "weight_norm/dense" in run.data.metrics
    ('FINISHED', 'regularizer', True)
    """


    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str = "keras_l2",
        run_name: str | None = None,
        nested: bool = False,
        parent_run_id: str | None = None,
        tags: dict | None = None,
        log_every_n_steps: int | None = None,
        log_params: bool = True,
        max_delay: float = 5.0,
        spool_dir=None,
        verbose: int = 1,
    ):
        super().__init__()
        self.store = resolve_store(tracking_uri)
        self.settings = Settings(experiment_name, run_name, nested, parent_run_id, tags, log_every_n_steps,
                                 log_params, max_delay, verbose)
        self._cadence = None if log_every_n_steps is None else Cadence(log_every_n_steps)
        self._outbox = Outbox(self.store, spool_dir=spool_dir, request_timeout=self.settings.request_timeout)
        self._outbox.prepare()  # the delivery process starts (imports MLflow) while the model is built
        self._tracked = TrackedRun(self._outbox, self.settings)
        self._spool_checked = False
        self._run = None  # the outbox's key for the run being logged to; None: not logging
        self._start_values = None  # the norms and lambda at train begin, until the first epoch begins
        self._l2_model = None
        self._in_fit = False
        self._reported_error = False
        # JAX: step norms are read when the next step begins (see `on_train_batch_begin`).
        self._step_norms_at_begin = self._cadence is not None and backend.step_reads_before_donation()
        self._norm_cadence = Cadence(log_every_n_steps) if self._step_norms_at_begin else None
        import mlflow  # noqa: F401 - here, once: importing it takes a second, not fit's time

    # ------------------------------------------------------------------ public
    @property
    def run_id(self) -> str | None:
        """The MLflow run id; waits up to `max_delay` s for a pending creation (None if still pending)."""
        return None if self._run is None else self._outbox.run_id(self._run, timeout=self.settings.max_delay)

    @property
    def tracking_uri(self) -> str:
        return self.store.tracking_uri

    def client(self):
        """An `mlflow.MlflowClient` on this logger's store."""
        import mlflow

        return mlflow.MlflowClient(tracking_uri=self.store.tracking_uri)

    def flush(self, timeout: float | None = None) -> bool:
        """Sends everything queued, waiting at most `timeout` s (default `max_delay`)."""
        return self._outbox.flush(self.settings.max_delay if timeout is None else timeout)

    def close(self, status: str = "FINISHED") -> bool:
        """Ends a run this logger started and still has open, flushes, detaches the metrics."""
        self._tracked.end(status)
        if self._l2_model is not None:
            detach_l2_metrics(self._l2_model)
        return self.flush()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        self.close("FAILED" if exc_type is not None else "FINISHED")
        return False

    # --------------------------------------------------------------- callbacks
    def set_model(self, model):
        super().set_model(model)
        # Our own reference: on JAX, `self.model` syncs the whole training
        # state back into the variables, which per batch would cost a lot.
        self._l2_model = model
        attach_l2_metrics(model)

    def on_train_begin(self, logs=None):
        model = self._l2_model
        if self._tracked.owned:  # the previous fit with this logger raised
            self.close("FAILED")
            attach_l2_metrics(model)
            if model.train_function is None:
                # `fit` made its step function before this hook; attaching (on JAX
                # and PyTorch) dropped it, and `fit` would call None.
                model.make_train_function()
        self._in_fit = True
        self._run = self._start_values = None
        self._epoch_start_step = 0
        for cadence in (self._cadence, self._norm_cadence):
            if cadence is not None:
                cadence.reset()
        try:
            self._describe(model)  # bad set-ups are refused here, before the first step
        except Exception:
            self._in_fit = False
            detach_l2_metrics(model)
            raise
        if backend.is_chief(model):  # one run per fit, not one per worker
            self._start_run(model)

    @never_raises
    def _start_run(self, model):
        if not self._spool_checked:
            self._spool_checked = True
            self._outbox.adopt_spool()
        self._run = self._tracked.start()
        if self.settings.log_params:
            epochs = (self.params or {}).get("epochs")
            self._outbox.log(self._run, params=fit_params(model, optimizer_chain(getattr(model, "optimizer", None)),
                                                          self._l2_params, epochs))
        self._outbox.log(self._run, tags=self._dense.tags())
        values = norm_metrics(self._norm_keys, self._norms())
        values["lambda"] = self._current_lambda(model)
        # Logged when the first epoch begins, at its number: a resumed fit (initial_epoch=5) starts at step 5.
        self._start_values = values
        if self.settings.verbose:
            print(f"MlflowL2Logger: logging to {self.store.tracking_uri} (experiment "
                  f"{self.settings.experiment_name!r}, route {self._route}).")

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        self._log_start(epoch)

    @never_raises
    def _log_start(self, step: int) -> None:
        if self._run is not None and self._start_values is not None:
            self._outbox.log(self._run, metrics=self._start_values, step=step)
            self._start_values = None

    @never_raises
    def on_epoch_end(self, epoch, logs=None):
        if self._run is None:
            return
        if self._step_norms_at_begin:
            self._log_step_norms(self._cadence.highest)  # the epoch's last step (batch ends are flushed)
        values = keras_values(logs or {})
        values.update(norm_metrics(self._norm_keys, self._norms()))
        # Schedules (LambdaScheduler) set lambda when an epoch begins, so at its
        # end lambda is still the one its steps used.
        values["lambda"] = self._current_lambda(self._l2_model)
        self._outbox.log(self._run, metrics=values, step=epoch + 1)

    def on_train_end(self, logs=None):
        self._in_fit = False
        self._log_start(0)  # a fit with no epoch to run
        self._finish()

    def on_test_end(self, logs=None):
        if not self._in_fit:  # a standalone evaluate(callbacks=[logger])
            detach_l2_metrics(self._l2_model)

    def on_predict_end(self, logs=None):
        if not self._in_fit:
            detach_l2_metrics(self._l2_model)

    @never_raises
    def _finish(self):
        self.close("FINISHED")
        if self.settings.verbose and self._run is not None:
            # No second wait: close() already waited max_delay for delivery.
            run_id = self._outbox.run_id(self._run, timeout=0.0)
            print(f"MlflowL2Logger: run {run_id or '(pending delivery)'} in {self.store.tracking_uri}. "
                  f"{ui_hint(self.store, run_id)}")

    # ------------------------------------------------------------------ helpers
    def _describe(self, model):
        description = describe(model)  # raises if the routes disagree
        self._dense = DenseKernels.of(backend.all_layers(model), description.chosen_kernel_ids)
        self._kernels, self._norm_keys = self._dense.kernels, self._dense.keys
        self._norms = reader_for(model, self._kernels)
        if description.route == "none":
            LOG.warning("keras_l2: model %r uses no keras_l2 route; MlflowL2Logger logs it as an "
                        "unregularized baseline (l2.route=none, lambda 0, l2_penalty 0).", model.name)
        self._route = description.route
        self._l2_params = description_params(description, self._dense.chosen_names)

    def _current_lambda(self, model) -> float:
        value = l2_routes(model).l2
        return 0.0 if value is None else float(value)
