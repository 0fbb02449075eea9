"""Lambda where a route's compiled steps read it: a variable on TensorFlow, the float elsewhere.

Part of the adapter (`keras_l2.backend`). A traced TensorFlow step reads a
captured variable each time it runs, so a route that keeps lambda in one
(`hold_lambda`) and hands it to its step (`step_lambda`) can change lambda
with no new step functions; `keras_l2.steps` asks `steps_read_lambda`
whether a change needs them.

Example:

>>> from keras_l2 import L2Regularizer
>>> from keras_l2.backend import lambdas
>>> route = L2Regularizer(l2=0.5)
>>> route.l2 = 0.25
>>> float(lambdas.step_lambda(route, route.l2))
0.25
"""

from __future__ import annotations

import keras

_LAMBDA = "_keras_l2_lambda"


def steps_read_lambda() -> bool:
    """Whether traced steps read a route's lambda when they run, so a new lambda needs no new step functions.

    TensorFlow's `tf.function` reads a captured variable each time it runs
    (`hold_lambda` keeps one per route). JAX passes only the model's and
    the optimizer's state into a traced step and bakes in any other value
    when it traces; torch traces nothing, so new step functions cost nothing
    there.
    """
    return keras.backend.backend() == "tensorflow"


def hold_lambda(owner, value: float) -> None:
    """Keeps `value` where `owner`'s traced steps read it (a float64 variable on TensorFlow; a no-op elsewhere).

    float64, whatever the model's dtype: the coefficients `l2 / n` and
    `2 * l2 / n` are then formed in double precision and rounded once to the
    weights' dtype, exactly as from the Python float, so the routes' values
    are bit for bit those of a lambda traced as a constant. Set from eager
    code (a callback, `set_l2`), never inside a step.
    """
    if not steps_read_lambda():
        return
    variable = owner.__dict__.get(_LAMBDA)
    if variable is not None:
        variable.assign(value)
        return
    import tensorflow as tf

    with tf.init_scope():  # eager even if the route is made while a function traces
        variable = tf.Variable(value, dtype=tf.float64, trainable=False, name="keras_l2_lambda")
    # Around the owner's attribute tracking: a Keras optimizer would make it
    # one of its variables (and checkpoint it); this is a read-through copy.
    object.__setattr__(owner, _LAMBDA, variable)


def step_lambda(owner, value: float):
    """Lambda as `owner`'s traced steps should read it: its held variable, or `value` itself."""
    variable = owner.__dict__.get(_LAMBDA)
    return value if variable is None else variable
