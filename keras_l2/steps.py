"""The one owner of a model's compiled step functions, as far as keras_l2 touches them.

Two things keras_l2 does change what a traced train/test step computes:

- a new lambda on JAX and PyTorch (the regularizer and loss routes, and the
  `l2_penalty` metric of every route, trace lambda as a constant there; on
  TensorFlow they read it from a variable, `keras_l2.backend.lambdas`,
  so a new lambda needs no new functions);
- attaching or detaching the in-step metrics (`keras_l2.metrics`).

Both go through here: `retrace` makes the next step use new functions, and
`attach`/`detach` swap in step functions traced with or without the
metrics. On TensorFlow the functions of the other state are kept, keyed by
everything a trace bakes in that keras_l2 knows of, so one logger per `fit`
does not retrace every time. `set_l2` asks `needs_retrace` rather than
knowing which routes trace what.

Example:

>>> import keras
>>> from keras_l2 import steps
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
>>> model.compile(optimizer="sgd", loss="mse")
>>> steps.metrics_hook(model) is None
True
"""

from __future__ import annotations

import collections

import keras
from keras import ops

from keras_l2 import backend
from keras_l2.backend import lambdas, traces
from keras_l2.inventory import L2Routes, penalty_terms

_STATE = "_keras_l2_step_state"
_STEP_FUNCTIONS = ("train_function", "test_function")
_CACHED_FUNCTIONS = 4


class _State:
    """What keras_l2 keeps on a model: the metrics hook, and traced step functions.

    A plain object on purpose: Keras' saver walks a model's attributes and
    skips what is neither saveable nor a container.
    """

    def __init__(self):
        self.hook = None
        self.last_hook = None  # the hook detached last: kept traces update its metric, so a new hook reuses it
        self.functions: collections.OrderedDict = collections.OrderedDict()
        self.fresh = False  # built by keras_l2 for one run, its layers in no other model (`mark_fresh`)


def _state(model) -> _State:
    state = model.__dict__.get(_STATE)
    if state is None:
        state = _State()
        object.__setattr__(model, _STATE, state)
    return state


def retrace(model) -> None:
    """Makes a compiled model pick up a changed penalty at its next step.

    A new route (`regularize`) always needs new functions; so does a new
    lambda where it is a constant of the trace (JAX, PyTorch; see
    `needs_retrace`). `fit` reads `model.train_function` before every step,
    so this also works from a callback between epochs.

    A fresh model (`mark_fresh`) not yet compiled has no step traced, and no
    other model traces its kernels, so there is nothing to forget: JAX's
    caches stay. Any other model may share layers with a compiled one, whose
    traces hold the old penalty too, and JAX's caches are cleared for all.
    """
    state = model.__dict__.get(_STATE)
    if state is not None and state.fresh and not getattr(model, "compiled", False):
        return
    backend.forget_jax_traces()
    _remake(model)


def renew(model) -> None:
    """Makes `model` trace new step functions, from its next step on, without touching other models.

    For a change that only this model's steps see: a stack's members' metrics
    hooks, which its step calls (`keras_l2.search.stacked`). Keras reads
    `train_function` before every step, so this works from `on_train_begin`.
    """
    _remake_anew(model, now=True)


def _remake(model) -> None:
    if getattr(model, "train_function", None) is not None:
        model.make_train_function(force=True)
    if getattr(model, "test_function", None) is not None:
        model.make_test_function(force=True)


def _remake_anew(model, now: bool) -> None:
    """New train and test functions for a compiled model, traced anew: made `now`, or where Keras'
    own would share a trace with the old ones (JAX: made under keys only they hold), else at the
    next `fit` or `evaluate`."""
    for name in _STEP_FUNCTIONS:
        setattr(model, name, None)
    # An optimizer not yet built: no step function was ever made (every fit and evaluate builds it
    # first), and one made now would take its shardings from a state not yet built.
    built = getattr(getattr(model, "optimizer", None), "built", False)
    if getattr(model, "compiled", False) and (now or (built and traces.traces_keyed_by_method())):
        with traces.renewed_step_methods(model):
            model.make_train_function(force=True)
            model.make_test_function(force=True)


def build_step_state(model) -> None:
    """Builds a compiled model's metrics and optimizer now, so that its train step is traced once.

    Keras on TensorFlow (without a distribution strategy) builds both inside
    the first trace of the train step, and a `tf.function` whose first trace
    creates variables traces a second time. Built here, with the values
    Keras' own build gives them (JAX and PyTorch build them before the first
    step anyway), the first trace of a one-output model is the only one: the
    first epoch of a 7-member digits stack took 3.4 s instead of 6.1 s, one
    run's 0.84 s instead of 1.2 s (TensorFlow, without XLA as Keras' `auto`
    runs it on a CPU; 2-core CPU). The metrics are built by one prediction on
    zeros, which draws no random numbers and updates no state (`training=False`),
    against zero labels of the prediction's shape (one-hot, as every route's
    categorical cross-entropy takes them); a model without numeric `inputs`
    keeps Keras' way. The optimizer is built once every layer is (before, its
    variables do not exist).
    """
    inputs = getattr(model, "inputs", None) or []
    numeric = all(keras.backend.is_float_dtype(t.dtype) or keras.backend.is_int_dtype(t.dtype) for t in inputs)
    if getattr(model, "compiled", False) and inputs and numeric:
        zeros = [ops.zeros((1, *(d or 1 for d in t.shape[1:])), dtype=t.dtype) for t in inputs]
        prediction = model(zeros[0] if len(zeros) == 1 else zeros, training=False)
        backend.update_compiled_metrics(model, keras.tree.map_structure(ops.zeros_like, prediction), prediction, None)
        model.reset_metrics()
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or optimizer.built or not model.trainable_variables:
        return
    if all(layer.built for layer in backend.all_layers(model, include_self=True)):
        optimizer.build(model.trainable_variables)


def mark_fresh(model) -> None:
    """Records that `model` was just built for one run, its layers in no other model.

    Until it is compiled, applying a route to it then leaves JAX's caches
    alone (`retrace`). Clearing them, which only traced models need, made
    every later model compile even its initializers and eager operations
    again: 2.4 s per 784-1024-1024-10 member of a stack on a 2-core CPU.
    """
    _state(model).fresh = True


def metrics_hook(model):
    """The hook `keras_l2.metrics` attached to `model`, or None."""
    state = model.__dict__.get(_STATE)
    return None if state is None else state.hook


def last_metrics_hook(model):
    """The hook detached from `model` last, or None: a kept trace updates its metric, not a new one's."""
    state = model.__dict__.get(_STATE)
    return None if state is None else state.last_hook


def needs_retrace(model, routes: L2Routes) -> bool:
    """Whether a new lambda on `routes` reaches `model`'s steps only through new step functions.

    On TensorFlow every route's traced step reads lambda from a variable.
    Elsewhere the optimizer route does; the penalty routes, and the
    `l2_penalty` metric for every route, trace it as a constant.
    """
    if lambdas.steps_read_lambda():
        return False
    return bool(routes.regularizers or routes.losses or metrics_hook(model) is not None)


def attach(model, hook) -> None:
    """Records `hook` as attached and puts in place step functions traced with it."""
    state = _state(model)
    state.hook = hook
    _switch(model, state, attached=True)


def detach(model):
    """Forgets the attached hook (returned, or None) and puts back step functions traced without it."""
    state = model.__dict__.get(_STATE)
    if state is None or state.hook is None:
        return None
    hook, state.hook = state.hook, None
    state.last_hook = hook
    _switch(model, state, attached=False)
    return hook


def _switch(model, state: _State, attached: bool) -> None:
    """Puts in place step functions traced with (or without) the metrics.

    Where the backend keeps traced functions (TensorFlow), those in use are
    stored under the other state and those of this state restored; a miss
    leaves `None`, which Keras re-creates at the next `fit`/`evaluate`.
    """
    if not backend.keeps_traced_functions():
        # JAX: new step functions of this model alone (its own hook changed); other models'
        # programs stay compiled, as `jax.clear_caches()` would not leave them.
        _remake_anew(model, now=False)
        return
    key = _trace_key(model)
    current = tuple(getattr(model, name, None) for name in _STEP_FUNCTIONS)
    if any(fn is not None for fn in current):
        state.functions[(not attached, key)] = current
        state.functions.move_to_end((not attached, key))
        while len(state.functions) > _CACHED_FUNCTIONS:
            state.functions.popitem(last=False)
    restored = state.functions.get((attached, key), (None,) * len(_STEP_FUNCTIONS))
    for name, fn in zip(_STEP_FUNCTIONS, restored, strict=True):
        setattr(model, name, fn)


def _trace_key(model) -> tuple:
    """Everything a trace bakes in that keras_l2 knows of: the compiled objects, each route's terms, trainability.

    Functions are kept only on TensorFlow, whose steps read lambda from each
    route's variable: the key holds which variable (a new route, say from
    `regularize`, has another), not its value. A kept trace holds its
    variables, so their ids stay unique while it is kept.
    """
    terms = tuple((tuple(id(k) for k in kernels), id(l2), n)
                  for kernels, l2, n, _ in penalty_terms(model, in_step=True))
    trainable = tuple(layer.trainable for layer in backend.all_layers(model, include_self=True))
    return backend.compiled_identity(model), terms, trainable, getattr(model, "jit_compile", None)
