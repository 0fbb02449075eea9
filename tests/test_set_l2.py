"""Lambda changes between epochs take effect at once, on every route and backend."""

import keras
import numpy as np
import pytest
from helpers import ROUTES, compile_route, data, mlp, reference_gd, weights

from keras_l2 import l2_routes, select_layers, set_l2

pytestmark = pytest.mark.core

X, Y = data(examples=24)
LR = 0.5
SCHEDULE = [0.0, 0.2, 0.2, 0.05, 0.8, 0.0]  # one lambda per epoch (one step per epoch)


class SetLambda(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        set_l2(self.model, SCHEDULE[epoch])


@pytest.mark.parametrize("route", ROUTES)
def test_lambda_schedule_matches_reference(float64, route):
    model = mlp()
    compile_route(model, route, keras.optimizers.SGD(LR), 1.0, len(X), select_layers(model))
    initial = weights(model)
    model.fit(X, Y, batch_size=len(X), epochs=len(SCHEDULE), shuffle=False, verbose=0, callbacks=[SetLambda()])
    expected = reference_gd(initial, X, Y, LR, len(X), SCHEDULE)
    tolerance = 1e-6 if keras.backend.backend() == "torch" else 1e-8
    for got, want in zip(weights(model), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=tolerance)
    # Had the change not taken effect, the constant-lambda run would be it.
    stale = reference_gd(initial, X, Y, LR, len(X), [1.0] * len(SCHEDULE))
    assert np.max(np.abs(weights(model)[0] - stale[0])) > 1e3 * tolerance
    assert l2_routes(model).l2 == SCHEDULE[-1]


@pytest.mark.parametrize("route", ["regularizer", "loss"])
def test_validation_loss_sees_new_lambda(float64, route):
    model = mlp()
    compile_route(model, route, keras.optimizers.SGD(0.0), 0.0, len(X), select_layers(model))
    history = model.fit(X, Y, validation_data=(X, Y), batch_size=len(X), epochs=2, verbose=0,
                        callbacks=[keras.callbacks.LambdaCallback(
                            on_epoch_begin=lambda epoch, logs: set_l2(model, 5.0 * epoch))])
    kernels = [model.get_layer("hidden").kernel, model.get_layer("out").kernel]
    penalty = 5.0 / len(X) * sum(float(np.sum(np.square(keras.ops.convert_to_numpy(k)))) for k in kernels)
    val = history.history["val_loss"]
    np.testing.assert_allclose(val[1] - val[0], penalty, rtol=1e-6)


@pytest.mark.parametrize("mode", ["coupled", "decoupled"])
def test_optimizer_lambda_changes_without_retrace(float64, mode):
    model = mlp()
    compile_route(model, mode, keras.optimizers.SGD(LR), 1.0, len(X), select_layers(model))
    model.fit(X, Y, batch_size=len(X), epochs=1, shuffle=False, verbose=0)
    traced = model.train_function
    set_l2(model, 0.25)
    model.fit(X, Y, batch_size=len(X), epochs=1, shuffle=False, verbose=0)
    assert model.train_function is traced
    assert model.optimizer.l2 == 0.25


def test_penalty_routes_retrace_on_change(float64):
    model = mlp()
    compile_route(model, "loss", keras.optimizers.SGD(LR), 1.0, len(X), select_layers(model))
    model.fit(X, Y, batch_size=len(X), epochs=1, shuffle=False, verbose=0)
    traced = model.train_function
    set_l2(model, 0.25)
    assert model.train_function is not traced
