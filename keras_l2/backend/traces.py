"""New traces for one model's step functions on JAX, leaving every other compiled program alone.

Part of the adapter (`keras_l2.backend`). Keras' JAX trainer jits the bound
method `model.train_step` (and `test_step`, `predict_step`), and JAX finds a
trace by that function and the arguments' shapes. Bound methods of one model
are equal to each other, so a new `jax.jit` of `model.train_step` finds the
last trace again, with whatever it baked in (the metrics attached then, the
lambda of then). `renew_step_methods` puts a new callable in front of each
step method on the model itself: a new key, so its next step functions trace
anew. `jax.jit` needs nothing else cleared, so the programs of other models,
the initializers and the eager operations stay compiled (clearing all of
JAX's caches instead made a 7-run digits sweep of 20 epochs take 41-44 s
where it takes 26-29 s, on a 2-core CPU).

Example:

>>> import keras
>>> from keras_l2.backend import traces
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
>>> traces.renew_step_methods(model)  # on JAX: the next fit or evaluate traces its steps anew
>>> callable(model.train_step)
True
"""

from __future__ import annotations

import functools

import keras

STEP_METHODS = ("train_step", "test_step", "predict_step")


class _Renewed(functools.partial):
    """A step method behind a new identity (a partial with no arguments: it calls the method)."""


def renew_step_methods(model) -> None:
    """On JAX, makes the next `jax.jit` of `model`'s step methods trace them anew (a no-op elsewhere).

    The callable put on the model calls what was there before (the class's
    method, or one the user set on the model), so what a step computes does
    not change; only the key under which JAX keeps its trace does.
    """
    if keras.backend.backend() != "jax":
        return
    for method in STEP_METHODS:
        current = model.__dict__.get(method)
        target = current.func if isinstance(current, _Renewed) else getattr(model, method)
        setattr(model, method, _Renewed(target))
