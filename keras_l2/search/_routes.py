"""Temporary home of the route vocabulary until `keras_l2.routes` holds it (the core contract)."""

from __future__ import annotations

import keras

from keras_l2.loss import L2CategoricalCrossentropy
from keras_l2.optimizer import L2DecayOptimizer
from keras_l2.regularizer import regularize

ROUTES = ("regularizer", "loss", "coupled", "decoupled")
OPTIMIZERS = ("adam", "sgd", "rmsprop")


def apply_route(model, route: str, optimizer, l2: float, n: int, layers) -> tuple:
    """Puts L2 on `layers` through `route`; returns the `(optimizer, loss)` to compile with."""
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


def make_optimizer(name: str, learning_rate: float):
    return {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD,
            "rmsprop": keras.optimizers.RMSprop}[name](learning_rate)
