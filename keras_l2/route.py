"""The one interface every keras_l2 route answers.

A route is an object that puts `P = l2 / n * sum_l ||W_l||_F^2` (or its
gradient, or the matching decay) on some kernels: `L2Regularizer` on the
kernel it is attached to, `L2CategoricalCrossentropy` and `L2DecayOptimizer`
on their chosen layers. Whatever needs to know about routes (the inventory,
the single-route check, the metrics, `set_l2`, the logger) asks these
questions and never which class it holds.

Example:

>>> import keras
>>> from keras_l2 import L2Regularizer
>>> route = L2Regularizer(l2=1e-3, n=10)
>>> route.kind, route.mode, route.in_loss, route.l2, route.n
('regularizer', 'penalty', True, 0.001, 10)
"""

from __future__ import annotations

from keras_l2._checks import check_l2
from keras_l2.backend import lambdas

KINDS = ("regularizer", "loss", "optimizer")


class L2Route:
    """What a keras_l2 route is: its kind, mode, lambda, n and the kernels it covers.

    A mixin of the three route classes; it holds no state of its own, so the
    Keras base classes keep theirs (and their serialization) untouched.

    Attributes:
        kind: "regularizer", "loss" or "optimizer".
        mode: "penalty" (the term is in the loss), "coupled" or "decoupled".
        in_loss: whether the route's term is part of Keras' `loss` (the
            regularizer and loss routes) or applied in the update (the optimizer).
        l2: lambda, a float >= 0.
        n: the number of training examples, an int >= 1.
    """

    kind: str
    mode: str = "penalty"
    l2: float
    n: int

    @property
    def in_loss(self) -> bool:
        return self.kind != "optimizer"

    @property
    def step_l2(self):
        """Lambda as a traced step reads it: a variable where the backend reads one at run time, else `l2`.

        On TensorFlow a new lambda then reaches compiled steps without a
        retrace (`keras_l2.backend.lambdas`); elsewhere it is a
        constant of the trace and `keras_l2.set_l2` makes new step functions.
        """
        return lambdas.step_lambda(self, self.l2)

    def kernels(self, model) -> list:
        """The kernel variables of `model` this route regularizes."""
        raise NotImplementedError

    def covers(self, kernel) -> bool:
        """Whether this route regularizes `kernel` (answered without binding to a model)."""
        raise NotImplementedError


class LambdaAttribute:
    """A route's lambda as a class attribute, checked by `check_l2` on every assignment.

    Each assignment also reaches the variable that traced steps read on
    TensorFlow (`keras_l2.backend.lambdas`). Elsewhere a compiled model
    sees a new lambda only with new step functions: `keras_l2.set_l2(model,
    value)` assigns and makes them where needed.
    """

    def __set_name__(self, owner, name):
        self._slot = "_" + name

    def __get__(self, obj, objtype=None):
        return self if obj is None else getattr(obj, self._slot)

    def __set__(self, obj, value):
        value = check_l2(value)
        setattr(obj, self._slot, value)
        lambdas.hold_lambda(obj, value)
