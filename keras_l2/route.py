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

    def kernels(self, model) -> list:
        """The kernel variables of `model` this route regularizes."""
        raise NotImplementedError

    def covers(self, kernel) -> bool:
        """Whether this route regularizes `kernel` (answered without binding to a model)."""
        raise NotImplementedError
