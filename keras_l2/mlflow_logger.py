"""`MlflowL2Logger`: what lambda did to every layer, per epoch, in MLflow."""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import math
import threading
import weakref

import keras
import numpy as np
from keras import ops

from keras_l2 import backend, l2_math
from keras_l2.backend import all_layers, is_chief
from keras_l2.delivery import Outbox
from keras_l2.inventory import describe, l2_routes, optimizer_chain
from keras_l2.metrics import DATA_LOSS, PENALTY, attach_l2_metrics, detach_l2_metrics
from keras_l2.mlflow_names import sanitize, unique_keys
from keras_l2.tracking_store import resolve_store

LOG = logging.getLogger("keras_l2")
NORM_PREFIX = "weight_norm/"
STEP_PREFIX = "step/"
_MAX_PARAM_LENGTH = 6000
_UNFINISHED: weakref.WeakSet = weakref.WeakSet()


def _never_raises(hook):
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


class MlflowL2Logger(keras.callbacks.Callback):
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
      or not. Step 0 holds the initial norms and lambda;
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

    The tracking store never stalls or fails training: records are sent from
    a background thread; while the store is unreachable they are kept and
    retried; at train end the logger waits at most `max_delay` seconds, then
    saves what is left under `mlruns/keras_l2_pending/` and sends it later
    (see `keras_l2.delivery`). Errors inside the logger are reported once and
    never raised out of `fit`; bad arguments are refused here, before training.

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
        if not isinstance(experiment_name, str) or not experiment_name.strip() or len(experiment_name) > 500:
            raise ValueError(
                f"`experiment_name` must be a non-empty string of at most 500 characters. "
                f"Received: experiment_name={experiment_name!r}"
            )
        if log_every_n_steps is not None and (
            isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1
        ):
            raise ValueError(
                f"`log_every_n_steps` must be None (per epoch only) or an integer >= 1. "
                f"Received: log_every_n_steps={log_every_n_steps!r}"
            )
        if isinstance(max_delay, bool) or not isinstance(max_delay, (int, float)) or not (
            math.isfinite(max_delay) and max_delay >= 0
        ):
            raise ValueError(f"`max_delay` must be a finite number of seconds >= 0. Received: max_delay={max_delay!r}")
        if tags is not None and not isinstance(tags, dict):
            raise TypeError(f"`tags` must be a dict of tag names to values. Received: tags={tags!r}")
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.nested = bool(nested)
        if parent_run_id is not None and (not isinstance(parent_run_id, str) or not parent_run_id):
            raise ValueError(f"`parent_run_id` must be a run id string. Received: parent_run_id={parent_run_id!r}")
        self.parent_run_id = parent_run_id
        self.tags = {sanitize(k): str(v) for k, v in (tags or {}).items()}
        self.log_every_n_steps = log_every_n_steps
        self.log_params = bool(log_params)
        self.max_delay = float(max_delay)
        self.verbose = verbose
        self._outbox = Outbox(self.store, spool_dir=spool_dir, request_timeout=min(5.0, max(1.0, self.max_delay)))
        self._spool_checked = False
        self._run = None  # the outbox's key for the run being logged to; None: not logging
        self._owns_run = False
        self._l2_model = None
        self._in_fit = False
        self._reported_error = False
        self._step_lock = threading.Lock()
        # JAX: step norms are read when the next step begins (see below).
        self._step_norms_at_begin = log_every_n_steps is not None and backend.step_reads_before_donation()
        if log_every_n_steps is not None:
            # Only then: without a callback that has its own `on_train_batch_end`,
            # Keras may dispatch batch ends asynchronously (on PyTorch and JAX; never
            # on TensorFlow, which Keras does not count as thread-safe). Ours is safe
            # to run that way (Keras' `async_safe`): steps need not wait for the host.
            self.on_train_batch_end = self._on_step_end
            self.async_safe = True
            if self._step_norms_at_begin:
                # Between JAX steps the weights live in the trainer's state, which
                # the next step donates (deletes): read from Keras' worker thread
                # they may already be gone (under DataParallel, a segfault). So the
                # norms of step s are read when step s + 1 begins (a synchronous
                # hook, before the donation), and the last step's at epoch end.
                self.on_train_batch_begin = self._read_step_norms
        import mlflow  # noqa: F401 - here, once: importing it takes a second, not fit's time

    # ------------------------------------------------------------------ public
    @property
    def run_id(self) -> str | None:
        """The MLflow run id; waits up to `max_delay` s for a pending creation (None if still pending)."""
        return None if self._run is None else self._outbox.run_id(self._run, timeout=self.max_delay)

    @property
    def tracking_uri(self) -> str:
        return self.store.tracking_uri

    def client(self):
        """An `mlflow.MlflowClient` on this logger's store."""
        import mlflow

        return mlflow.MlflowClient(tracking_uri=self.store.tracking_uri)

    def flush(self, timeout: float | None = None) -> bool:
        """Sends everything queued, waiting at most `timeout` s (default `max_delay`)."""
        return self._outbox.flush(self.max_delay if timeout is None else timeout)

    def close(self, status: str = "FINISHED") -> bool:
        """Ends a run this logger started and still has open, flushes, detaches the metrics."""
        if self._owns_run and self._run is not None:
            self._outbox.end_run(self._run, status)
            self._owns_run = False
            _UNFINISHED.discard(self)
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
        if self._owns_run:  # the previous fit with this logger raised
            self.close("FAILED")
            attach_l2_metrics(model)
            if model.train_function is None:
                # `fit` made its step function before this hook; attaching (on JAX
                # and PyTorch) dropped it, and `fit` would call None.
                model.make_train_function()
        self._in_fit = True
        self._run = None
        self._global_step = self._last_step_logged = self._last_norm_step = self._epoch_start_step = 0
        try:
            self._describe(model)  # bad set-ups are refused here, before the first step
        except Exception:
            self._in_fit = False
            detach_l2_metrics(model)
            raise
        if is_chief(model):  # one run per fit, not one per worker
            self._start_run(model)

    @_never_raises
    def _start_run(self, model):
        if not self._spool_checked:
            self._spool_checked = True
            self._outbox.adopt_spool()
        import mlflow

        active = None if self.parent_run_id is not None else mlflow.active_run()
        if active is not None and mlflow.get_tracking_uri() != self.store.tracking_uri:
            LOG.warning("keras_l2: the active MLflow run %s is on %s, but this logger logs to %s; it "
                        "starts a run of its own there.", active.info.run_id, mlflow.get_tracking_uri(),
                        self.store.tracking_uri)
            active = None
        if active is not None and not self.nested:
            self._run = self._outbox.use_run(active.info.run_id)
            self._outbox.log(self._run, tags=self.tags)
        else:
            from mlflow.tracking.context.registry import resolve_tags

            self._run = self._outbox.create_run(
                self.experiment_name,
                run_name=self.run_name,
                tags=resolve_tags(self.tags),
                parent_run_id=self.parent_run_id if active is None else active.info.run_id,
            )
            self._owns_run = True
            _UNFINISHED.add(self)
        if self.log_params:
            self._outbox.log(self._run, params=self._params(model))
        self._outbox.log(self._run, tags={f"l2.regularized/{key}": str(flag).lower()
                                          for key, flag in zip(self._norm_keys, self._regularized, strict=True)})
        values = self._norm_metrics()
        values["lambda"] = self._current_lambda(model)
        self._outbox.log(self._run, metrics=values, step=0)
        if self.verbose:
            print(f"MlflowL2Logger: logging to {self.store.tracking_uri} (experiment "
                  f"{self.experiment_name!r}, route {self._route}).")

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start_step = self._global_step

    @_never_raises
    def _on_step_end(self, batch, logs=None):
        # Possibly on one of Keras' worker threads, possibly out of order.
        if self._run is None:
            return
        step = self._epoch_start_step + batch + 1
        with self._step_lock:
            self._global_step = max(self._global_step, step)
            if not self._is_logged_step(step, self._last_step_logged):
                return
            self._last_step_logged = step
        values = self._values(logs or {})
        if not self._step_norms_at_begin:
            # Run asynchronously (PyTorch), the weights read here may be a step newer than `step`.
            values.update(self._norm_metrics(_live_values(self._l2_model, self._kernels)))
        values["lambda"] = self._current_lambda(self._l2_model)
        self._outbox.log(self._run, metrics={STEP_PREFIX + key: v for key, v in values.items()}, step=step)

    @_never_raises
    def _read_step_norms(self, batch, logs=None):
        """JAX: logs the norms of the last step if it is a logged one (see `__init__`)."""
        if self._run is None:
            return
        self._log_step_norms(self._epoch_start_step + batch)

    def _log_step_norms(self, step: int) -> None:
        if not self._is_logged_step(step, self._last_norm_step):
            return
        self._last_norm_step = step
        norms = self._norm_metrics(_live_values(self._l2_model, self._kernels))
        self._outbox.log(self._run, metrics={STEP_PREFIX + key: v for key, v in norms.items()}, step=step)

    def _is_logged_step(self, step: int, last_logged: int) -> bool:
        """Whether global step `step` crosses a multiple of k since `last_logged`.

        Not `step % k == 0`: with `steps_per_execution` > 1 Keras reports only
        every few steps, and may skip the multiple itself.
        """
        k = self.log_every_n_steps
        return step > last_logged and step // k != last_logged // k

    @_never_raises
    def on_epoch_end(self, epoch, logs=None):
        if self._run is None:
            return
        if self._step_norms_at_begin:
            self._log_step_norms(self._global_step)  # the epoch's last step (batch ends are flushed)
        values = self._values(logs or {})
        values.update(self._norm_metrics())
        # Schedules (LambdaScheduler) set lambda when an epoch begins, so at its
        # end lambda is still the one its steps used.
        values["lambda"] = self._current_lambda(self._l2_model)
        self._outbox.log(self._run, metrics=values, step=epoch + 1)

    def on_train_end(self, logs=None):
        self._in_fit = False
        self._finish()

    def on_test_end(self, logs=None):
        if not self._in_fit:  # a standalone evaluate(callbacks=[logger])
            detach_l2_metrics(self._l2_model)

    def on_predict_end(self, logs=None):
        if not self._in_fit:
            detach_l2_metrics(self._l2_model)

    @_never_raises
    def _finish(self):
        self.close("FINISHED")
        if self.verbose and self._run is not None:
            run_id = self.run_id
            print(f"MlflowL2Logger: run {run_id or '(pending delivery)'} in {self.store.tracking_uri}. "
                  f"Open the UI with `mlflow ui --backend-store-uri {self.store.tracking_uri}` (or `make ui`).")

    # ------------------------------------------------------------------ helpers
    def _describe(self, model):
        description = describe(model)  # raises if the routes disagree
        dense = [layer for layer in all_layers(model) if isinstance(layer, keras.layers.Dense) and layer.built]
        self._kernels = [layer.kernel for layer in dense]
        self._norms = _norm_reader(model, self._kernels)
        self._norm_keys = unique_keys(layer.name for layer in dense)
        self._regularized = [id(k) in description.chosen_kernel_ids for k in self._kernels]
        if description.route == "none":
            LOG.warning("keras_l2: model %r uses no keras_l2 route; MlflowL2Logger logs it as an "
                        "unregularized baseline (l2.route=none, lambda 0, l2_penalty 0).", model.name)
        self._route, self._mode = description.route, description.mode
        self._l2_description = {
            "l2.lambda": 0.0 if description.l2 is None else description.l2,
            "l2.n": ",".join(map(str, description.ns)),
            "l2.route": self._route,
            "l2.mode": self._mode,
            "l2.layers": ",".join(layer.name for layer, flag in zip(dense, self._regularized, strict=True) if flag),
        }

    def _params(self, model) -> dict:
        params = dict(self._l2_description)
        chain = list(optimizer_chain(getattr(model, "optimizer", None)))
        if chain:
            params["optimizer.class"] = "(".join(type(o).__name__ for o in chain) + ")" * (len(chain) - 1)
            inner = chain[-1]
            for key, value in inner.get_config().items():
                if key == "name":  # Keras numbers it per process (adam, adam_1, ...): noise between runs
                    continue
                simple = value is None or isinstance(value, (int, float, str, bool))
                params[f"optimizer.{sanitize(key)}"] = value if simple else json.dumps(value, default=str)
        params["model.params"] = model.count_params()
        params["model.trainable_params"] = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
        params["keras.backend"] = backend.name()
        epochs = (self.params or {}).get("epochs")
        if epochs is not None:
            params["fit.epochs"] = epochs
        return {k: str(v)[:_MAX_PARAM_LENGTH] for k, v in params.items()}

    def _current_lambda(self, model) -> float:
        value = l2_routes(model).l2
        return 0.0 if value is None else float(value)

    def _values(self, logs: dict) -> dict:
        """Keras logs and the derived `regularized_loss`, as Python floats."""
        result = {}
        for name, value in logs.items():
            # Keras hands callbacks Python floats already; anything else must be a scalar.
            if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
                result[name] = float(value)
            elif hasattr(value, "shape") and int(np.prod(value.shape)) == 1:
                result[name] = float(np.asarray(ops.convert_to_numpy(value)).reshape(()))
        for prefix in ("", "val_"):
            if prefix + DATA_LOSS in result and prefix + PENALTY in result:
                result[prefix + "regularized_loss"] = result[prefix + DATA_LOSS] + result[prefix + PENALTY]
        return {sanitize(k): v for k, v in result.items()}

    def _norm_metrics(self, kernel_values=None) -> dict:
        """`weight_norm/<layer>` for every Dense kernel (the live values, or `kernel_values`)."""
        norms = self._norms(kernel_values)
        return {NORM_PREFIX + key: float(v) for key, v in zip(self._norm_keys, norms, strict=True)}


class _NormReader:
    """`[||W||_F for W in kernels]` in one compiled call and one device-to-host copy.

    Dispatching the dozen eager ops per log would cost more than computing them.
    """

    def __init__(self, kernels):
        self.kernels = list(kernels)
        self._read = backend.CompiledRead(lambda values: ops.stack(l2_math.kernel_norms(values)), self.kernels)
        self._fn = self._read.compiled

    def __call__(self, values=None) -> np.ndarray:
        return self._read(values)


# One compiled reader per model, shared by the loggers of its fits: a logger per
# fit (as in a sweep, or `fit` called in a loop) would otherwise trace anew each
# time, and TensorFlow warns about that after five.
_NORM_READERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _norm_reader(model, kernels) -> _NormReader:
    reader = _NORM_READERS.get(model)
    if reader is None or [id(k) for k in reader.kernels] != [id(k) for k in kernels]:
        reader = _NORM_READERS[model] = _NormReader(kernels)
    return reader


def _live_values(model, kernels):
    """The kernels' current values; mid-epoch on JAX they live in the trainer's state."""
    return backend.live_values(model, kernels)


@atexit.register
def _fail_unfinished() -> None:
    # A run this process started and never finished: its `fit` raised.
    for logger in list(_UNFINISHED):
        with contextlib.suppress(Exception):
            logger.close("FAILED")
