"""Which keras_l2 route a model uses, and changing its lambda.

Example:

>>> import keras
>>> from keras_l2 import regularize, set_l2, l2_routes
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
>>> _ = regularize(model, l2=1e-3)
>>> set_l2(model, 1e-2)
>>> l2_routes(model).l2
0.01
"""

from __future__ import annotations

import dataclasses

import keras

from keras_l2._checks import check_l2
from keras_l2._retrace import retrace
from keras_l2._single_route import optimizer_chain
from keras_l2.loss import L2CategoricalCrossentropy
from keras_l2.optimizer import L2DecayOptimizer
from keras_l2.regularizer import L2Regularizer
from keras_l2.selection import all_layers


@dataclasses.dataclass(frozen=True)
class L2Routes:
    """The keras_l2 objects found on a model.

    Attributes:
        regularizers: `(kernel_variable, L2Regularizer)` pairs.
        losses: the `L2CategoricalCrossentropy` losses the model is compiled with.
        optimizers: the `L2DecayOptimizer`s in the model's optimizer chain.
    """

    regularizers: tuple = ()
    losses: tuple = ()
    optimizers: tuple = ()

    @property
    def names(self) -> tuple:
        """The routes in use: a subset of ("regularizer", "loss", "optimizer")."""
        found = (("regularizer", self.regularizers), ("loss", self.losses), ("optimizer", self.optimizers))
        return tuple(name for name, objects in found if objects)

    @property
    def l2(self) -> float | None:
        """The lambda of the routes in use (None if none is); they must agree."""
        values = {reg.l2 for _, reg in self.regularizers}
        values |= {loss.l2 for loss in self.losses}
        values |= {opt.l2 for opt in self.optimizers}
        if len(values) > 1:
            raise ValueError(f"The model's keras_l2 routes use different lambdas: {sorted(values)}")
        return values.pop() if values else None


def l2_routes(model) -> L2Routes:
    """Finds the keras_l2 regularizers, losses and optimizers on `model`."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"Expected a `keras.Model`. Received: model={model!r} of type {type(model).__name__}")
    regularizers = tuple(
        (v, v.regularizer) for v in model.trainable_variables if isinstance(v.regularizer, L2Regularizer)
    )
    losses = tuple(
        loss for loss in keras.tree.flatten(getattr(model, "loss", None)) if isinstance(loss, L2CategoricalCrossentropy)
    )
    optimizers = tuple(
        opt for opt in optimizer_chain(getattr(model, "optimizer", None)) if isinstance(opt, L2DecayOptimizer)
    )
    return L2Routes(regularizers, losses, optimizers)


def set_l2(model, l2: float) -> None:
    """Sets lambda on every keras_l2 route of `model`, effective at the next step.

    Safe between epochs (e.g. from a callback's `on_epoch_begin`) on every
    backend: the optimizer route updates its lambda variable in place; the
    regularizer and loss routes get retraced train and test functions,
    because their lambda is a constant of the traced step.

    Raises:
        ValueError: a bad `l2`, or a model that uses no keras_l2 route.
    """
    l2 = check_l2(l2)
    routes = l2_routes(model)
    if not routes.names:
        raise ValueError(
            f"Model {model.name!r} uses no keras_l2 route (no L2Regularizer, "
            "L2CategoricalCrossentropy or L2DecayOptimizer), so there is no lambda to set."
        )
    # On JAX the live state sits outside the variables during `fit`; pull it
    # back first so the assignment below is not overwritten at epoch end.
    sync = getattr(model, "jax_state_sync", None)
    if sync is not None:
        sync()
    for _, regularizer in routes.regularizers:
        regularizer.l2 = l2
    for layer in _layers_with_l2_regularizer(model):
        layer.kernel_regularizer.l2 = l2
    for loss in routes.losses:
        loss.l2 = l2
    for optimizer in routes.optimizers:
        optimizer.l2 = l2
    from keras_l2.metrics import l2_metrics_attached

    # The penalty routes (and the `l2_penalty` metric, for every route) trace
    # lambda as a constant.
    if routes.regularizers or routes.losses or l2_metrics_attached(model):
        retrace(model)


def _layers_with_l2_regularizer(model):
    for layer in all_layers(model):
        if isinstance(getattr(layer, "kernel_regularizer", None), L2Regularizer):
            yield layer
