"""New traces for one model's step functions on JAX, leaving every other compiled program alone.

Part of the adapter (`keras_l2.backend`). Keras' JAX trainer jits the bound
method `model.train_step` (and `test_step`), and JAX finds a trace by that
function and the arguments' shapes. Bound methods of one model are equal to
each other, so while an earlier step function is alive, a new `jax.jit` of
`model.train_step` finds its trace again, with whatever it baked in (the
metrics attached then, the lambda of then). Inside `renewed_step_methods` each
step method is behind a new callable on the model itself: step functions made
there trace anew under a key only they hold. On leaving, the model's own
methods are back, so step functions Keras makes later (after a `compile`) are
keyed as Keras keys them, and no key outlives the functions made with it.
`jax.jit` needs nothing else cleared, so the programs of other models, the
initializers and the eager operations stay compiled (clearing all of JAX's
caches instead made a 7-run digits sweep of 20 epochs take 40.9-53.2 s where
it takes 26.3-38.4 s, on a 2-core CPU).

Example:

>>> import keras
>>> from keras_l2.backend import traces
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
>>> model.compile(optimizer="sgd", loss="mse")
>>> with traces.renewed_step_methods(model):  # on JAX: what is made here traces anew
...     model.make_train_function(force=True)
>>> "train_step" in vars(model)
False
"""

from __future__ import annotations

import contextlib
import functools

import keras

STEP_METHODS = ("train_step", "test_step")


class _Renewed(functools.partial):
    """A step method behind a new identity (a partial with no arguments: it calls the method)."""


def traces_keyed_by_method() -> bool:
    """Whether new step functions can find an old trace through an equal step method (JAX)."""
    return keras.backend.backend() == "jax"


@contextlib.contextmanager
def renewed_step_methods(model):
    """On JAX, puts `model`'s step methods behind new keys until the block ends (a no-op elsewhere).

    The callable put on the model calls what was there before (the class's
    method, or one the user set on the model), so what a step computes does
    not change; only the key under which JAX keeps its trace does.
    """
    if not traces_keyed_by_method():
        yield
        return
    before = {method: model.__dict__[method] for method in STEP_METHODS if method in model.__dict__}
    for method in STEP_METHODS:
        model.__dict__[method] = _Renewed(getattr(model, method))
    try:
        yield
    finally:
        for method in STEP_METHODS:
            if method in before:
                model.__dict__[method] = before[method]
            else:
                model.__dict__.pop(method, None)
