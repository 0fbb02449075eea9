"""`l2_penalty` and `data_loss` against a NumPy reference, averaged as Keras averages `loss`."""

import keras
import numpy as np
import pytest

from keras_l2 import attach_l2_metrics, detach_l2_metrics, regularize, select_layers, set_l2
from tests.helpers import ROUTES, compile_route, data, mlp, reference_gd, reference_loss, reported_rtol, weights

pytestmark = pytest.mark.core

LAMBDA, LR = 0.3, 0.1
RTOL = max(1e-10, reported_rtol())  # against NumPy
EXACT = max(1e-14, reported_rtol())  # between metrics Keras averages the same way


def _cce(params, x, y):
    return reference_loss(params, x, y, 0.0, 1)[0]


def _penalty(params, lam, n, chosen):
    return lam / n * sum(float((w**2).sum()) for w, c in zip(params[0::2], chosen, strict=True) if c)


@pytest.mark.parametrize("chosen", [(True, True), (False, True)], ids=["both", "out"])
@pytest.mark.parametrize("route", ROUTES)
def test_epoch_metrics_equal_numpy_reference(float64, route, chosen):
    x, y = data(24)
    xv, yv = data(9, seed=5)
    n = 24
    model = mlp()
    w0 = weights(model)
    names = [name for name, c in zip(("hidden", "out"), chosen, strict=True) if c]
    compile_route(model, route, keras.optimizers.SGD(LR), LAMBDA, n, select_layers(model, names=names))
    attach_l2_metrics(model)
    history = model.fit(x, y, batch_size=24, epochs=3, shuffle=False, verbose=0, validation_data=(xv, yv)).history
    in_loss = route in ("regularizer", "loss")
    for epoch in range(3):
        start = reference_gd(w0, x, y, LR, n, [LAMBDA] * epoch, chosen)
        end = reference_gd(w0, x, y, LR, n, [LAMBDA] * (epoch + 1), chosen)
        penalty = _penalty(start, LAMBDA, n, chosen)
        np.testing.assert_allclose(history["l2_penalty"][epoch], penalty, rtol=RTOL)
        np.testing.assert_allclose(history["data_loss"][epoch], _cce(start, x, y), rtol=RTOL)
        expected_loss = _cce(start, x, y) + (penalty if in_loss else 0.0)
        np.testing.assert_allclose(history["loss"][epoch], expected_loss, rtol=RTOL)
        np.testing.assert_allclose(history["val_l2_penalty"][epoch], _penalty(end, LAMBDA, n, chosen), rtol=RTOL)
        np.testing.assert_allclose(history["val_data_loss"][epoch], _cce(end, xv, yv), rtol=RTOL)


class _StepRecorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.params_at_step = []

    def on_train_batch_begin(self, batch, logs=None):
        self.params_at_step.append(weights(self.model))


@pytest.mark.parametrize("route", ROUTES)
def test_minibatch_epoch_average_weights_steps_by_batch_size(float64, route):
    # 25 examples in batches of 10: 10, 10, 5. Keras weights each step's loss
    # by its batch size; the penalty and data loss must be averaged the same way.
    x, y = data(25)
    model = mlp()
    compile_route(model, route, keras.optimizers.Adam(0.05), LAMBDA, 25, select_layers(model))
    attach_l2_metrics(model)
    recorder = _StepRecorder()
    history = model.fit(x, y, batch_size=10, epochs=2, shuffle=False, verbose=0, callbacks=[recorder]).history
    sizes = np.array([10, 10, 5])
    for epoch in range(2):
        steps = recorder.params_at_step[3 * epoch: 3 * epoch + 3]
        batches = [(x[i:i + 10], y[i:i + 10]) for i in (0, 10, 20)]
        penalties = np.array([_penalty(p, LAMBDA, 25, (True, True)) for p in steps])
        losses = np.array([_cce(p, bx, by) for p, (bx, by) in zip(steps, batches, strict=True)])
        np.testing.assert_allclose(history["l2_penalty"][epoch], (sizes * penalties).sum() / 25, rtol=RTOL)
        np.testing.assert_allclose(history["data_loss"][epoch], (sizes * losses).sum() / 25, rtol=RTOL)
        if route in ("regularizer", "loss"):
            total = history["data_loss"][epoch] + history["l2_penalty"][epoch]
            np.testing.assert_allclose(history["loss"][epoch], total, rtol=EXACT, atol=0)
        else:
            np.testing.assert_allclose(history["loss"][epoch], history["data_loss"][epoch], rtol=EXACT)


def _sgd_on_both_layers(route):
    """The note's network with L2 on both kernels through `route`, SGD; returns it, its start and 24 examples."""
    x, y = data(24)
    model = mlp()
    w0 = weights(model)
    compile_route(model, route, keras.optimizers.SGD(LR), LAMBDA, 24, select_layers(model))
    return model, w0, x, y


@pytest.mark.parametrize("route", ROUTES)
def test_penalty_metric_follows_a_changed_lambda(float64, route):
    model, w0, x, y = _sgd_on_both_layers(route)
    attach_l2_metrics(model)
    first = model.fit(x, y, batch_size=24, epochs=1, shuffle=False, verbose=0).history
    set_l2(model, 2 * LAMBDA)
    second = model.fit(x, y, batch_size=24, epochs=1, shuffle=False, verbose=0).history
    start = reference_gd(w0, x, y, LR, 24, [LAMBDA], (True, True))
    np.testing.assert_allclose(first["l2_penalty"][0], _penalty(w0, LAMBDA, 24, (True, True)), rtol=RTOL)
    np.testing.assert_allclose(second["l2_penalty"][0], _penalty(start, 2 * LAMBDA, 24, (True, True)), rtol=RTOL)


def test_detach_restores_the_model(tmp_path):
    x, y = data(24)
    model = mlp()
    compile_route(model, "regularizer", "sgd", LAMBDA, 24, select_layers(model))
    before = model.evaluate(x, y, verbose=0)
    attach_l2_metrics(model)
    attach_l2_metrics(model)  # idempotent
    assert set(model.evaluate(x, y, verbose=0, return_dict=True)) == {"loss", "l2_penalty", "data_loss"}
    detach_l2_metrics(model)
    assert "compute_loss" not in vars(model)
    assert model.evaluate(x, y, verbose=0) == before
    model.save(tmp_path / "m.keras")
    restored = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(restored.predict(x, verbose=0), model.predict(x, verbose=0))


def test_a_user_metric_with_the_same_name_is_refused():
    model = mlp()
    model.compile(optimizer="sgd", loss="categorical_crossentropy",
                  metrics=[keras.metrics.MeanSquaredError(name="data_loss")])
    model.evaluate(*data(4), verbose=0)
    with pytest.raises(ValueError, match=r"already has metrics named \['data_loss'\]"):
        attach_l2_metrics(model)


@pytest.mark.parametrize("route", ROUTES)
def test_a_second_attach_reports_the_metrics_again(float64, route):
    """One logger per `fit` attaches and detaches each time; a kept trace must update the metric reported."""
    model, w0, x, y = _sgd_on_both_layers(route)
    for _ in range(2):
        attach_l2_metrics(model)
        history = model.fit(x, y, batch_size=24, epochs=1, shuffle=False, verbose=0).history
        detach_l2_metrics(model)
    start = reference_gd(w0, x, y, LR, 24, [LAMBDA], (True, True))
    np.testing.assert_allclose(history["l2_penalty"][0], _penalty(start, LAMBDA, 24, (True, True)), rtol=RTOL)
    np.testing.assert_allclose(history["data_loss"][0], _cce(start, x, y), rtol=RTOL)


def test_a_new_regularizer_is_never_served_a_kept_trace(float64):
    """`regularize` puts new regularizers (new lambda variables on TensorFlow) on the same kernels."""
    model, w0, x, y = _sgd_on_both_layers("regularizer")
    attach_l2_metrics(model)
    model.fit(x, y, batch_size=24, epochs=1, shuffle=False, verbose=0)
    detach_l2_metrics(model)
    regularize(model, l2=3 * LAMBDA, n=24)
    attach_l2_metrics(model)
    history = model.fit(x, y, batch_size=24, epochs=1, shuffle=False, verbose=0).history
    start = reference_gd(w0, x, y, LR, 24, [LAMBDA], (True, True))
    penalty = _penalty(start, 3 * LAMBDA, 24, (True, True))
    np.testing.assert_allclose(history["l2_penalty"][0], penalty, rtol=RTOL)
    np.testing.assert_allclose(history["loss"][0], _cce(start, x, y) + penalty, rtol=RTOL)


@pytest.mark.parametrize("route", ROUTES)
def test_reattaching_reuses_traces_but_never_a_stale_lambda(float64, route):
    model, w0, x, y = _sgd_on_both_layers(route)
    model.fit(x, y, batch_size=24, epochs=1, shuffle=False, verbose=0)
    plain = model.train_function
    attach_l2_metrics(model)
    model.fit(x, y, batch_size=24, epochs=1, shuffle=False, verbose=0)
    with_metrics = model.train_function
    detach_l2_metrics(model)
    tensorflow = keras.backend.backend() == "tensorflow"
    assert (model.train_function is plain) == tensorflow  # no retrace for the next fit without metrics
    attach_l2_metrics(model)
    assert (model.train_function is with_metrics) == tensorflow  # nor with them
    detach_l2_metrics(model)
    set_l2(model, 2 * LAMBDA)  # a trace constant of the penalty routes and the metric, except on TensorFlow
    attach_l2_metrics(model)
    assert (model.train_function is with_metrics) == tensorflow
    history = model.fit(x, y, batch_size=24, epochs=1, shuffle=False, verbose=0).history
    start = reference_gd(w0, x, y, LR, 24, [LAMBDA, LAMBDA], (True, True))
    np.testing.assert_allclose(history["l2_penalty"][0], _penalty(start, 2 * LAMBDA, 24, (True, True)), rtol=RTOL)
    detach_l2_metrics(model)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="categorical_crossentropy")
    attach_l2_metrics(model)
    if keras.backend.backend() != "jax":
        assert model.train_function is None  # a recompile invalidates every kept trace
    else:  # where an attach makes its functions at once, under new keys
        assert model.train_function not in (plain, with_metrics)
    assert with_metrics is not None and plain is not None


def test_attaching_and_detaching_leave_every_other_compiled_program(monkeypatch):
    """On JAX, clearing all of JAX's caches at each attach made every later model compile everything again.

    The new step functions come from new keys instead (`keras_l2.backend.traces`); that they never
    serve a stale trace is `test_reattaching_reuses_traces_but_never_a_stale_lambda`'s to check.
    """
    from keras_l2 import backend

    cleared = []
    monkeypatch.setattr(backend, "forget_jax_traces", lambda: cleared.append("forget_jax_traces"))
    if keras.backend.backend() == "jax":
        import jax

        monkeypatch.setattr(jax, "clear_caches", lambda: cleared.append("jax.clear_caches"))
    model, _, x, y = _sgd_on_both_layers("coupled")
    for _ in range(2):
        attach_l2_metrics(model)
        history = model.fit(x, y, batch_size=24, epochs=1, shuffle=False, verbose=0).history
        detach_l2_metrics(model)
        assert "l2_penalty" in history
    assert cleared == []


def test_a_recompiled_model_evaluates_its_new_loss_after_a_logged_fit(float64):
    """The new keys of the metrics' step functions must not outlive them: a later `compile` gets Keras' own."""
    model, _, x, y = _sgd_on_both_layers("regularizer")
    attach_l2_metrics(model)
    model.fit(x, y, batch_size=24, epochs=1, shuffle=False, verbose=0)
    detach_l2_metrics(model)
    model.evaluate(x, y, verbose=0)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    recompiled = model.evaluate(x, y, verbose=0)  # before anything else clears JAX's caches (`regularize` would)
    fresh = mlp()
    fresh.set_weights(model.get_weights())
    regularize(fresh, l2=LAMBDA, n=24, layers=select_layers(fresh))
    fresh.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    np.testing.assert_allclose(recompiled, fresh.evaluate(x, y, verbose=0), rtol=EXACT)
