"""The one adapter between keras_l2 and the Keras backend it runs on.

Every `keras.backend.backend()` branch of keras_l2, every import of
TensorFlow or JAX, and every use of a private Keras, TensorFlow, JAX or
PyTorch attribute lives here, in the manner of Keras' own `backend/` folder: the
math, the routes, the metrics and tracking ask this module, so that a Keras
release that moves an internal breaks one file. `tests/test_backend.py`
checks each of these against the installed Keras (and on PyTorch the
multi-tensor multiply of `backend.updates`) and fails with a message
that names what moved.

Example:

>>> import keras
>>> from keras_l2 import backend
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d")])
>>> [layer.name for layer in backend.all_layers(model)], backend.replicas()
(['input_layer', 'd'], 1)
"""

from __future__ import annotations

import contextlib
import inspect

import keras
import numpy as np
from keras import ops


def name() -> str:
    """The Keras backend in use: "tensorflow", "jax" or "torch"."""
    return keras.backend.backend()


# ----------------------------------------------------------- tf.distribute
# Under a TensorFlow strategy with R replicas, each replica's loss is divided
# by R and the replicas' gradients are summed. A term added on every replica
# (the penalty in the loss, `2 * l2 / n * W` in the gradient) must be divided
# by R too, or it counts R times. Keras does this for `model.losses` (the
# regularizer route); the loss and coupled routes add their term themselves.


def replicas() -> int:
    """R: the number of replicas in sync (1 outside a TensorFlow strategy)."""
    if name() != "tensorflow":
        return 1
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync


def per_replica(value):
    """Returns `value / R` inside a TensorFlow strategy with R > 1 replicas, else `value`."""
    count = replicas()
    if count == 1:
        return value
    return ops.multiply(value, ops.convert_to_tensor(1.0 / count, dtype=value.dtype))


def all_replicas(value):
    """Undoes `per_replica`: `value * R` (what Keras' loss tracker records)."""
    count = replicas()
    if count == 1:
        return value
    return ops.multiply(value, ops.convert_to_tensor(float(count), dtype=value.dtype))


def strategy_scope(model):
    """The scope of `model`'s TensorFlow strategy (a no-op on other backends).

    A metric's variables made in it are the strategy's (sync-on-read, summed
    over every replica of every worker), like those Keras makes in `compile`.
    """
    if name() != "tensorflow":
        return contextlib.nullcontext()
    return model.distribute_strategy.scope()


def is_chief(model) -> bool:
    """False only on the non-chief workers of a multi-worker TensorFlow strategy.

    Under `MultiWorkerMirroredStrategy` every worker runs `fit` and its
    callbacks; what is to be written once (checkpoints, summaries, tracking)
    the chief writes (TensorFlow's `should_checkpoint`: worker 0 when the
    cluster has no "chief" task). True on one process, and on other backends.
    """
    if name() != "tensorflow":
        return True
    return bool(model.distribute_strategy.extended.should_checkpoint)


# ------------------------------------------------------------ tensors
def differentiable_read(variable):
    """The variable's value as a plain tensor, still differentiable.

    On TensorFlow Keras hands back the `tf.Variable` itself; a custom
    gradient must see a read of it, or eager TensorFlow refuses the function.
    """
    value = ops.convert_to_tensor(variable)
    if name() == "tensorflow":
        import tensorflow as tf

        value = tf.convert_to_tensor(value)
    return value


def sum_of_squares(flat):
    """`sum(square(flat))` of a 1-D tensor; on PyTorch one `torch.dot(flat, flat)`.

    Eager PyTorch runs `square` and `sum` as two kernels and allocates a
    copy of the kernel in between: about 3x the time of one dot product
    (1.0 against 0.3 ms for the 784-1024-1024 kernels, one CPU thread).
    """
    if name() == "torch":
        import torch

        return torch.dot(flat, flat)
    return ops.sum(ops.square(flat))


class CompiledRead:
    """`fn(values) -> tensor` compiled once over `variables`; calling it returns a NumPy array.

    One compiled call and one device-to-host copy, instead of a dozen eager
    ops per read. TensorFlow is handed the variables (it reads their live
    values), through one `tf.function` per `fn`, traced once per variable
    shapes: readers of one architecture (a sweep's runs, a stack's members)
    share a trace, and TensorFlow's "frequent retracing" warning stays away.
    JAX and torch are handed values: `read(values)` (on JAX, mid-epoch, the
    trainer's state: see `live_values`), or the variables' own with `read()`.

    Attributes:
        compiled: the compiled function (a `tf.function` on TensorFlow, a
            `jax.jit` on JAX, `fn` itself on torch; None without variables).
    """

    _tf_functions: dict = {}  # fn -> its tf.function, shared by every reader of fn

    def __init__(self, fn, variables):
        self.variables = list(variables)
        self._captures = name() == "tensorflow"
        if not self.variables:
            self.compiled = None
        elif self._captures:
            import tensorflow as tf

            if fn not in self._tf_functions:
                self._tf_functions[fn] = tf.function(fn)
            self.compiled = self._tf_functions[fn]
        elif name() == "jax":
            import jax

            self.compiled = jax.jit(fn)
        else:
            self.compiled = fn

    def __call__(self, values=None) -> np.ndarray:
        if self.compiled is None:
            return np.zeros((0,))
        if self._captures:
            return np.asarray(ops.convert_to_numpy(self.compiled(self.variables)))
        values = values if values is not None else [v.value for v in self.variables]
        return np.asarray(ops.convert_to_numpy(self.compiled(list(values))))


# ------------------------------------------------------------ models
def all_layers(model, include_self: bool = False) -> list:
    """Every layer inside `model`, nested models included, in build order."""
    # `_flatten_layers` is what Keras itself uses to collect `model.losses`
    # from nested layers; there is no public recursive equivalent.
    return list(model._flatten_layers(include_self=include_self, recursive=True))


def compiled_identity(model) -> tuple:
    """Identifies what `compile` put on `model`: its optimizer, loss and metrics containers.

    A recompile replaces them; a traced step bakes them in.
    """
    return tuple(id(getattr(model, attr, None)) for attr in ("optimizer", "_compile_loss", "_compile_metrics"))


def add_model_metric(model, metric) -> None:
    """Makes `metric` one of `model.metrics`: reset, synced and logged like Keras' own.

    The private `_metrics` list is what `Model.metrics` reports (and Keras'
    saver skips), unlike a tracked attribute.
    """
    model._metrics.append(metric)


def loss_tracker(model):
    """The `Mean` behind a compiled model's `loss` log (a stack updates each member's own)."""
    return model._loss_tracker


def update_compiled_metrics(model, y, y_pred, sample_weight) -> None:
    """Updates what `compile(metrics=...)` made, without reading every result back."""
    if model._compile_metrics is not None:
        model._compile_metrics.update_state(y, y_pred, sample_weight)


def remove_model_metric(model, metric) -> None:
    """Undoes `add_model_metric`."""
    model._metrics[:] = [m for m in model._metrics if m is not metric]


def calling_model(loss):
    """The model whose compiled loss `loss` is, found among the callers.

    Keras hands a loss no reference to its model, and a loss restored from a
    config only knows its layers by name. `Trainer.compute_loss` is on the
    stack whenever Keras calls a compiled loss, with `self` the model. Only
    frame names are read on the way up, so this stays cheap; under
    `tf.function` and `jax.jit` it runs only while tracing. No public hook
    exists (Keras 3.15); `tests/test_backend.py` fails clearly if Keras
    stops calling losses from `compute_loss`.
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_code.co_name == "compute_loss":
                candidate = frame.f_locals.get("self")
                if isinstance(candidate, keras.Model) and any(
                    item is loss for item in keras.tree.flatten(getattr(candidate, "loss", None))
                ):
                    return candidate
            frame = frame.f_back
    finally:
        del frame
    return None


# --------------------------------------------------------- optimizers
def own_optimizer_variables(optimizer) -> list:
    """The variables an optimizer made itself (not those of an optimizer it wraps)."""
    return optimizer._variables


def optimizer_trainable_variables(optimizer) -> list:
    """The model variables an optimizer was built for."""
    return optimizer._trainable_variables


# -------------------------------------------------- compiled step functions
def keeps_traced_functions() -> bool:
    """Whether a model's step functions are traced objects that can be kept and put back.

    Only TensorFlow's are: on JAX a new step function reuses the cache of the
    bound `train_step` (see `traces.renewed_step_methods`), and torch does not trace.
    """
    return name() == "tensorflow"


def forget_jax_traces() -> None:
    """On JAX, drops cached traces: new step functions alone do not retrace.

    Keras jits the bound method `model.train_step`, and JAX caches a trace by
    that function and the argument shapes, across `jax.jit` objects: while
    anything still holds the previous step function, a "new" one silently
    reuses the old trace, with the old lambda baked in (seen with JAX 0.10).
    """
    if name() == "jax":
        import jax

        jax.clear_caches()


def sync_training_state(model) -> None:
    """On JAX, pulls the live training state back into the variables (a no-op elsewhere).

    During `fit` the JAX trainer keeps weights and optimizer state outside
    the variables; an assignment to a variable would be overwritten when the
    epoch ends unless the state is synced first.
    """
    sync = getattr(model, "jax_state_sync", None)
    if sync is not None:
        sync()


def live_values(model, variables):
    """The variables' current values mid-epoch on JAX (the trainer's state); None when the variables hold them."""
    state = getattr(model, "_jax_state", None)
    if not state or getattr(model, "_jax_state_synced", True):
        return None
    index = {id(v): i for i, v in enumerate(model.trainable_variables)}
    trainable = state["trainable_variables"]
    return [trainable[index[id(v)]] if id(v) in index else v.value for v in variables]


def step_reads_before_donation() -> bool:
    """Whether step-level reads of the weights must happen when the next step begins.

    On JAX each step donates (deletes) the weights of the previous one, so a
    read from Keras' batch-end worker thread may find them gone (under
    DataParallel, a segfault). Elsewhere the batch end may read them.
    """
    return name() == "jax"
