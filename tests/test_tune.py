"""`keras-l2 tune`: the one-step hypergradient against finite differences, the tuner, its refusals."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_l2 import select_layers, set_l2
from keras_l2.routes import make_optimizer
from keras_l2.search.hypergradient import hypergradient
from tests.helpers import ROUTES, compile_route, data, mlp, reference_loss, weights

L2, N = 0.7, 16


def _rtol() -> float:
    # The finite difference below is float64 throughout (the real Keras step, then a NumPy validation loss).
    # The hypergradient's own validation gradient goes through Keras' Dense, whose `ops.matmul` rounds
    # float64 through float32 on torch (1.4e-7 off NumPy on a 4x3 @ 3x5 product, measured with Keras 3.15);
    # elsewhere it is float64 to rounding.
    return 1e-5 if keras.backend.backend() == "torch" else 1e-8


@pytest.mark.core
@pytest.mark.parametrize("optimizer", ["sgd", "sgd_momentum", "adam", "rmsprop"])
@pytest.mark.parametrize("route", ROUTES)
def test_hypergradient_matches_a_finite_difference_through_one_real_update(float64, route, optimizer):
    """d L_val / d lambda through one `train_on_batch` of the route, against the hypergradient, in float64."""
    x, y = data(examples=N, seed=0)
    x_val, y_val = data(examples=12, seed=1)
    as_tensor = lambda a: keras.ops.convert_to_tensor(a, "float64")  # noqa: E731 - numpy would go through floatx
    x, y, x_val_t, y_val_t = as_tensor(x), as_tensor(y), as_tensor(x_val), as_tensor(y_val)
    model = mlp()
    inner = keras.optimizers.SGD(0.1, momentum=0.9) if optimizer == "sgd_momentum" else make_optimizer(optimizer, 0.05)
    compile_route(model, route, inner, L2, N, select_layers(model, names=[model.layers[0].name]))
    for _ in range(3):  # Adam's and momentum's state is not zero, and Adam's bias correction is past step 1
        model.train_on_batch(x, y)
    value, h = hypergradient(model, (x, y), (x_val_t, y_val_t))

    start = [w.copy() for w in weights(model)]
    state = [np.array(keras.ops.convert_to_numpy(v)) for v in model.optimizer.variables]

    def val_loss_after_one_step(l2):
        for variable, value_ in zip(model.weights, start, strict=True):
            variable.assign(value_)
        for variable, value_ in zip(model.optimizer.variables, state, strict=True):
            variable.assign(value_)
        set_l2(model, l2)
        model.train_on_batch(x, y)
        return reference_loss(weights(model), x_val, y_val, l2, N)[0]

    d = 1e-3 * L2
    f = {k: val_loss_after_one_step(L2 + k * d) for k in (-2, -1, 1, 2)}
    finite_difference = (8 * (f[1] - f[-1]) - (f[2] - f[-2])) / (12 * d)  # fourth order in d
    assert h == pytest.approx(finite_difference, rel=_rtol(), abs=1e-12)
    assert abs(h) > 1e-6  # a real signal, not two zeros agreeing
    set_l2(model, L2)
    for variable, value_ in zip(model.optimizer.variables, state, strict=True):
        variable.assign(value_)
    for variable, value_ in zip(model.weights, start, strict=True):
        variable.assign(value_)
    model.train_on_batch(x, y)
    assert value == pytest.approx(reference_loss(weights(model), x_val, y_val, L2, N)[0], rel=_rtol())
