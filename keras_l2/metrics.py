"""The penalty and the data loss as Keras metrics, averaged in the graph as Keras averages `loss`.

`attach_l2_metrics(model)` adds two metrics to a compiled model:

- `l2_penalty`: `P = l2 / n * sum_l ||W_l||_F^2` over every chosen kernel of
  every keras_l2 route, at the weights the step's forward pass used;
- `data_loss`: Keras' loss without the part of `P` it contains (the
  regularizer and loss routes put `P` in the loss; the optimizer route does
  not, so there `data_loss` is Keras' `loss`).

Both are updated inside the compiled train and test steps, weighted by the
batch size exactly as Keras weights its `loss` tracker, so for the penalty
routes `loss == data_loss + l2_penalty` per epoch to float precision. Keras
then reports them like any metric: in `fit`'s logs and progress bar, in
`History`, and for validation as `val_l2_penalty` and `val_data_loss` (the
validation loss without the penalty, comparable across lambdas). Nothing
leaves the device per batch.

Example:

>>> import keras
>>> import numpy as np
>>> from keras_l2 import regularize
>>> from keras_l2.metrics import attach_l2_metrics, detach_l2_metrics
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
>>> _ = regularize(model, l2=1e-2)
>>> model.compile(optimizer="sgd", loss="categorical_crossentropy")
>>> attach_l2_metrics(model)
>>> history = model.fit(np.ones((8, 4)), np.eye(3)[[0, 1, 2, 0, 1, 2, 0, 1]], verbose=0)
>>> sorted(history.history)
['data_loss', 'l2_penalty', 'loss']
>>> detach_l2_metrics(model)
"""

from __future__ import annotations

import keras
from keras import ops

from keras_l2 import backend, l2_math, steps
from keras_l2.inventory import penalty_terms

PENALTY = "l2_penalty"
DATA_LOSS = "data_loss"


class L2LossMeans(keras.metrics.Metric):
    """Batch-size-weighted means of the penalty and the data loss, in one state.

    The arithmetic of Keras' `Mean` (which tracks `loss`): `total += value *
    weight`, `count += weight`, `result = total / count`, for two values at
    once, so a step pays one update of two variables, not two metrics' four.
    `result()` is a dict, which Keras reports as two logs.
    """

    def __init__(self, name="keras_l2_means", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.total = self.add_variable(shape=(2,), initializer="zeros", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, penalty, data_loss, weight):
        weight = ops.cast(weight, self.dtype)
        values = ops.stack([ops.cast(penalty, self.dtype), ops.cast(data_loss, self.dtype)])
        self.total.assign(ops.add(self.total, ops.multiply(values, weight)))
        self.count.assign(ops.add(self.count, weight))

    def result(self):
        means = ops.divide_no_nan(self.total, self.count)
        return {PENALTY: means[0], DATA_LOSS: means[1]}

    def reset_state(self):
        self.total.assign(ops.zeros((2,), dtype=self.dtype))
        self.count.assign(ops.zeros((), dtype=self.dtype))


class _Hook:
    def __init__(self, model, means=None):
        # In the model's strategy scope, as Keras makes its loss tracker: the
        # logger attaches in `set_model`, which `fit` calls outside the scope,
        # and plain variables there hold, under MultiWorkerMirroredStrategy,
        # the examples of their own worker only (data_loss was one worker's).
        if means is None:
            with backend.strategy_scope(model):
                means = L2LossMeans()
        self.means = means
        self.compute_loss = model.compute_loss  # the bound method we wrap
        self.had_own_compute_loss = "compute_loss" in model.__dict__


def attach_l2_metrics(model) -> None:
    """Adds `l2_penalty` and `data_loss` to `model`'s metrics (idempotent).

    Call before `fit`/`evaluate` (the `MlflowL2Logger` does it when training
    starts). The compiled step functions must then update the new metrics:
    TensorFlow traces them once more, and keeps both versions, so attaching
    and detaching again (one logger per `fit`) does not retrace every time.
    Undo with `detach_l2_metrics`.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"Expected a `keras.Model`. Received: model={model!r} of type {type(model).__name__}")
    if steps.metrics_hook(model) is not None:
        return
    clashes = sorted(set(_metric_names(model)) & {PENALTY, DATA_LOSS})
    if clashes:
        raise ValueError(
            f"Model {model.name!r} already has metrics named {clashes}; keras_l2 reports the "
            f"penalty and the data loss under these names. Rename your metrics."
        )
    # The metric of the hook detached last, if any: a step function kept on
    # TensorFlow (see `keras_l2.steps`) updates that metric's variables.
    previous = steps.last_metrics_hook(model)
    hook = _Hook(model, means=None if previous is None else previous.means)
    original = hook.compute_loss

    def compute_loss(*args, **kwargs):
        loss = original(*args, **kwargs)
        if loss is not None:
            x = kwargs["x"] if "x" in kwargs else (args[0] if args else None)
            _update(model, hook, x, loss)
        return loss

    # Keras reads `compute_loss` from the instance on every step it traces.
    model.compute_loss = compute_loss
    backend.add_model_metric(model, hook.means)
    steps.attach(model, hook)


def _metric_names(model):
    for metric in model.metrics:
        yield metric.name
        # `compile(metrics=...)` metrics sit inside one container metric.
        for inner in getattr(metric, "metrics", None) or ():
            yield inner.name


def detach_l2_metrics(model) -> None:
    """Removes what `attach_l2_metrics` added (a no-op if nothing is attached)."""
    hook = steps.metrics_hook(model)
    if hook is None:
        return
    backend.remove_model_metric(model, hook.means)
    if hook.had_own_compute_loss:
        model.compute_loss = hook.compute_loss
    else:
        del model.compute_loss
    steps.detach(model)


def l2_metrics_attached(model) -> bool:
    """Whether `attach_l2_metrics(model)` is in effect."""
    return steps.metrics_hook(model) is not None


def _update(model, hook, x, loss):
    total = in_loss = None
    for kernels, l2, n, counted in penalty_terms(model, in_step=True):
        value = l2_math.penalty(kernels, l2, n, dtype=loss.dtype)
        total = value if total is None else ops.add(total, value)
        if counted:
            in_loss = value if in_loss is None else ops.add(in_loss, value)
    if total is None:
        total = ops.zeros((), dtype=loss.dtype)
    # Keras' loss tracker sees the loss before its per-replica division and
    # weights each step by the batch size; do exactly the same.
    full_loss = backend.all_replicas(loss)
    data = full_loss if in_loss is None else ops.subtract(full_loss, in_loss)
    first = next(v for v in keras.tree.flatten(x) if v is not None)
    batch = ops.shape(first)[0]
    hook.means.update_state(total, data, batch)
