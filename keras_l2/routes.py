"""The route vocabulary (names, the name -> route switch, optimizer names) and changing lambda.

Four routes put the same L2 on chosen kernels (`docs/math.md`):

- `"regularizer"`: an `L2Regularizer` on each chosen kernel;
- `"loss"`: `L2CategoricalCrossentropy` over the chosen kernels;
- `"coupled"`, `"decoupled"`: an `L2DecayOptimizer` in that mode.

`apply_route` is the one switch from a name to a route, used by the sweep,
the benchmarks and the tests.

Example:

>>> import keras
>>> from keras_l2 import regularize, set_l2, l2_routes
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
>>> _ = regularize(model, l2=1e-3)
>>> set_l2(model, 1e-2)
>>> l2_routes(model).l2
0.01
>>> optimizer, loss = apply_route(model, "decoupled", make_optimizer("adam", 1e-3), 1e-3, 100, [])
Traceback (most recent call last):
...
ValueError: `layers` is empty: choose at least one Dense layer to regularize.
"""

from __future__ import annotations

import keras

from keras_l2 import backend, steps
from keras_l2._checks import OPTIMIZERS, ROUTES, check_l2
from keras_l2.inventory import l2_routes
from keras_l2.loss import L2CategoricalCrossentropy
from keras_l2.optimizer import L2DecayOptimizer
from keras_l2.regularizer import L2Regularizer, regularize

__all__ = ["OPTIMIZERS", "ROUTES", "apply_route", "make_optimizer", "set_l2"]


def make_optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    """A fresh Keras optimizer by its name in `OPTIMIZERS`."""
    classes = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD, "rmsprop": keras.optimizers.RMSprop}
    if name not in classes:
        raise ValueError(f"Unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return classes[name](learning_rate)


def apply_route(model, route: str, optimizer, l2: float, n: int, layers) -> tuple:
    """Puts L2 on `layers` through `route`; returns the `(optimizer, loss)` to compile with.

    Args:
        model: the built model the layers belong to.
        route: one of `ROUTES`.
        optimizer: the Keras optimizer to train with (wrapped for the optimizer routes).
        l2: lambda; n: the number of training examples.
        layers: the Dense layers to regularize (what `select_layers` returns).
    """
    loss = "categorical_crossentropy"
    if route == "regularizer":
        regularize(model, l2=l2, n=n, layers=layers)
    elif route == "loss":
        loss = L2CategoricalCrossentropy(l2=l2, n=n, layers=layers)
    elif route in ("coupled", "decoupled"):
        optimizer = L2DecayOptimizer(optimizer, l2=l2, n=n, layers=layers, mode=route)
    else:
        raise ValueError(f"Unknown route {route!r}; choose one of {', '.join(ROUTES)}")
    return optimizer, loss


def set_l2(model, l2: float) -> None:
    """Sets lambda on every keras_l2 route of `model`, effective at the next step.

    Safe between epochs (e.g. from a callback's `on_epoch_begin`) on every
    backend. On TensorFlow every route's compiled step reads lambda from a
    variable, updated in place. On JAX and PyTorch the optimizer route's is
    a variable too; the regularizer and loss routes (and the `l2_penalty`
    metric) get new train and test functions, because their lambda is a
    constant of the traced step there.

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
    backend.sync_training_state(model)
    for route in routes.routes:
        route.l2 = l2
    # A layer's `kernel_regularizer` is what `model.save` records; it may be
    # another object than the one on the variable.
    for layer in backend.all_layers(model):
        if isinstance(getattr(layer, "kernel_regularizer", None), L2Regularizer):
            layer.kernel_regularizer.l2 = l2
    if steps.needs_retrace(model, routes):
        steps.retrace(model)
