"""Lambda changes between epochs take effect at once, on every route and backend."""

import keras
import numpy as np
import pytest

from keras_l2 import L2DecayOptimizer, LambdaScheduler, l2_routes, regularize, select_layers, set_l2
from tests.helpers import ROUTES, compile_route, data, mlp, reference_gd, weights

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


@pytest.mark.parametrize("route", ["regularizer", "loss"])
def test_penalty_routes_retrace_only_where_lambda_is_a_trace_constant(float64, route):
    """TensorFlow's steps read lambda from a variable: the same functions see the new value."""
    model = mlp()
    compile_route(model, route, keras.optimizers.SGD(0.0), 1.0, len(X), select_layers(model))
    model.fit(X, Y, batch_size=len(X), epochs=1, shuffle=False, verbose=0)
    set_l2(model, 0.0)
    unpenalized = model.evaluate(X, Y, batch_size=len(X), verbose=0)
    traced, tested = model.train_function, model.test_function
    set_l2(model, 0.25)
    penalized = model.evaluate(X, Y, batch_size=len(X), verbose=0)
    tensorflow = keras.backend.backend() == "tensorflow"
    assert (model.train_function is traced) == tensorflow
    assert (model.test_function is tested) == tensorflow
    kernels = [model.get_layer("hidden").kernel, model.get_layer("out").kernel]
    penalty = 0.25 / len(X) * sum(float(np.sum(np.square(keras.ops.convert_to_numpy(k)))) for k in kernels)
    np.testing.assert_allclose(penalized - unpenalized, penalty, rtol=1e-6)  # torch logs float32


@pytest.mark.parametrize("route", ROUTES)
def test_lambda_scheduler_matches_reference_and_logs_lambda(float64, route):
    model = mlp()
    compile_route(model, route, keras.optimizers.SGD(LR), 1.0, len(X), select_layers(model))
    initial = weights(model)
    history = model.fit(X, Y, batch_size=len(X), epochs=len(SCHEDULE), shuffle=False, verbose=0,
                        callbacks=[LambdaScheduler(lambda epoch, l2: SCHEDULE[epoch])])
    expected = reference_gd(initial, X, Y, LR, len(X), SCHEDULE)
    tolerance = 1e-6 if keras.backend.backend() == "torch" else 1e-8
    for got, want in zip(weights(model), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=tolerance)
    assert history.history["lambda"] == SCHEDULE


def test_lambda_scheduler_sequence_and_bad_schedules():
    model = mlp()
    compile_route(model, "coupled", keras.optimizers.SGD(LR), 1.0, len(X), select_layers(model))
    history = model.fit(X, Y, epochs=3, verbose=0, callbacks=[LambdaScheduler([0.5, 0.25, 0.0])])
    assert history.history["lambda"] == [0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="Bad lambda for epoch 1 of the schedule.*l2=-1"):
        LambdaScheduler([0.1, -1])
    with pytest.raises(TypeError, match="must be a function"):
        LambdaScheduler("0.1")
    before = model.get_weights()
    with pytest.raises(ValueError, match="has 2 lambdas but fit runs 3 epochs"):
        model.fit(X, Y, epochs=3, verbose=0, callbacks=[LambdaScheduler([0.1, 0.2])])
    with pytest.raises(ValueError, match="bad lambda for epoch 0.*l2=nan"):
        model.fit(X, Y, epochs=1, verbose=0, callbacks=[LambdaScheduler(lambda epoch, l2: float("nan"))])
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_lambda_scheduler_needs_a_route():
    model = mlp()
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    with pytest.raises(ValueError, match="uses no keras_l2 route"):
        model.fit(X, Y, epochs=1, verbose=0, callbacks=[LambdaScheduler([0.1])])


def test_lambda_float32_cannot_hold_is_reported_as_set():
    """A float32 lambda variable rounds 1e-3; the routes must still agree on 1e-3."""
    model = mlp()
    regularize(model, l2=1e-3, layers=select_layers(model, names="hidden"))
    optimizer = L2DecayOptimizer(keras.optimizers.SGD(0.1), l2=1e-3, layers=select_layers(model, names="out"))
    model.compile(optimizer=optimizer, loss="categorical_crossentropy")
    history = model.fit(X, Y, epochs=2, verbose=0, callbacks=[LambdaScheduler([1e-3, 3e-3])])
    assert l2_routes(model).l2 == 3e-3
    assert history.history["lambda"] == [1e-3, 3e-3]
    assert float(keras.ops.convert_to_numpy(optimizer.l2_variable)) == np.float32(3e-3)


def test_regularizing_a_fresh_model_keeps_jax_caches(monkeypatch):
    """A run's fresh model has nothing traced: clearing JAX's caches would only make later models compile again."""
    from keras_l2 import backend
    from keras_l2.search.models import build_run

    cleared = []
    monkeypatch.setattr(backend, "forget_jax_traces", lambda: cleared.append(True))
    fresh = build_run(mlp, 0)  # as every run of a sweep and member of a stack is built
    regularize(fresh, l2=0.1, n=10)
    assert cleared == []
    fresh.compile(optimizer="sgd", loss="categorical_crossentropy")
    regularize(fresh, l2=0.2, n=10)
    assert cleared == [True]
    regularize(mlp(), l2=0.1, n=10)  # not known to be fresh: its layers may be in a compiled model
    assert cleared == [True, True]


def test_set_l2_on_an_inner_model_reaches_the_compiled_outer_model(float64):
    """The outer model traces the inner one's kernels: its steps must see the new lambda on every backend."""
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, kernel_initializer="ones")])
    outer = keras.Sequential([inner, keras.layers.Dense(2)])
    regularize(inner, l2=1.0, n=1)
    outer.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    x, y = np.ones((3, 4)), np.zeros((3, 2))
    before = outer.evaluate(x, y, verbose=0)
    set_l2(inner, 0.0)
    after = outer.evaluate(x, y, verbose=0)
    assert before - after > 30.0  # the penalty of a ones 4x8 kernel at lambda 1: 32
