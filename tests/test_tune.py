"""`keras-l2 tune`: the one-step hypergradient against finite differences, the tuner, its refusals."""

from __future__ import annotations

import json
import re

import keras
import mlflow
import numpy as np
import pytest

from keras_l2 import select_layers, set_l2
from keras_l2.routes import make_optimizer
from keras_l2.search.config import TuneConfig
from keras_l2.search.hypergradient import hypergradient
from keras_l2.search.tuning import confirmation, prepare_tune, run_tune
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


# ------------------------------------------------------------------ refusals of what the hypergradient cannot follow
@pytest.mark.parametrize(("make", "message"), [
    (lambda: keras.optimizers.SGD(0.1, clipnorm=1.0), "the optimizer sets {'clipnorm': 1.0}"),
    (lambda: keras.optimizers.Adam(1e-3, amsgrad=True), "the optimizer sets {'amsgrad': True}"),
    (lambda: keras.optimizers.RMSprop(1e-3, centered=True), "the optimizer sets {'centered': True}"),
    (lambda: keras.optimizers.Adagrad(1e-2), "follows Adam, SGD, RMSprop updates; received Adagrad"),
])
def test_an_update_the_hypergradient_cannot_follow_is_refused(make, message):
    model = mlp()
    compile_route(model, "coupled", make(), L2, N, select_layers(model))
    x, y = data(examples=N)
    with pytest.raises(ValueError, match=re.escape(message)):
        hypergradient(model, (x, y), (x, y))


def test_a_model_without_a_route_is_refused():
    model = mlp()
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    x, y = data(examples=N)
    with pytest.raises(ValueError, match="exactly one keras_l2 route .* Received: route 'none'"):
        hypergradient(model, (x, y), (x, y))


# ------------------------------------------------------------------ the confirmation's lambdas
@pytest.mark.parametrize(("estimate", "expected"), [
    (0.2, (0.1125, 0.3557)),  # inside the range: a quarter decade either side of the estimate
    (100.0, (56.23, 100.0, 177.8, 316.2, 1000.0)),  # at the upper end: a decade beyond too
    (1e-4, (0.0, 1e-05, 3.162e-05, 5.623e-05, 0.0001, 0.0001778)),  # at the lower end: below, and 0
])
def test_the_confirmation_reaches_beyond_the_range_when_stage_one_ends_at_its_edge(estimate, expected):
    assert confirmation(estimate, (1e-4, 1e2)) == expected


# ------------------------------------------------------------------ bad input, refused before any run
@pytest.mark.parametrize(("overrides", "arrays", "message"), [
    ({"lambda_range": (1.0, 1.0)}, None, "--range: 1,1 is not a range to search (it is empty"),
    ({"lambda_range": (-1.0, 1.0)}, None, "--range: -1,1 is not a range to search (lambda must be > 0"),
    ({"lambda_range": (1e-3,)}, None, "--range: two numbers low,high"),
    ({"layers": "nope"}, None, "--layers: 'nope' matches none of the Dense layers"),
    ({}, "no_validation", "x_val is empty"),
    ({}, "nan", "x_train holds NaN or infinite values (1 of them)"),
    ({"seed": -1}, None, "--seed: an integer >= 0. Received: -1"),
])
def test_bad_input_is_refused_before_any_run(tmp_path, overrides, arrays, message):
    x, y = data(examples=30, seed=0)
    x_val, y_val = data(examples=9, seed=1)
    if arrays == "no_validation":
        x_val, y_val = x_val[:0], y_val[:0]
    if arrays == "nan":
        x = x.copy()
        x[3, 2] = np.nan
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = TuneConfig(**{"hidden": (8,), "layers": None, "epochs": 1, "verbose": 0, "tracking_uri": store,
                           **overrides})
    with pytest.raises(ValueError, match=re.escape(message)):
        run_tune(config, data=(x, y.argmax(1), x_val, y_val.argmax(1)))
    if (tmp_path / "mlflow.db").exists():
        client = mlflow.MlflowClient(store)
        assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_tf_data_is_refused_by_tune(tmp_path):
    import tensorflow as tf

    x, y = data(examples=30)
    dataset = tf.data.Dataset.from_tensor_slices((x.astype("float32"), y.astype("float32"))).batch(10)
    with pytest.raises(ValueError, match="tune needs NumPy arrays"):
        prepare_tune(TuneConfig(hidden=(8,), layers=None, epochs=1, verbose=0,
                                tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), data=(dataset, dataset))


# ------------------------------------------------------------------ a whole tune, tracked
@pytest.mark.core
@pytest.mark.mlflow
def test_a_tune_logs_its_stages_children_and_answer(tmp_path, capsys):
    x, y = data(examples=60, inputs=5, seed=0)
    x_val, y_val = data(examples=30, inputs=5, seed=1)
    x_test, y_test = data(examples=30, inputs=5, seed=2)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = TuneConfig(hidden=(16,), layers=None, epochs=12, batch_size=16, lambda_range=(1e-2, 1e1),
                        tracking_uri=store, spool_dir=str(tmp_path / "spool"), log_every_n_steps=2)
    result = run_tune(config, data=(x, y, x_val, y_val, x_test, y_test))
    out = capsys.readouterr().out
    assert "Stage 1/2: one run, lambda held at 0.316228 for 6 epochs" in out and "Stage 2/2, confirm" in out

    # Stage 1: held for 6 epochs, then a move at the end of epochs 11 (6 + 5) only, from h at epochs 10 and 11.
    path = result["trajectory"]
    assert [l2 for _, l2, _ in path[:11]] == [0.316228] * 11 and path[11][1] != 0.316228
    assert [epoch for epoch, _, h in path if h is not None] == [10, 11]
    assert result["lambda_estimate"] == pytest.approx(path[11][1], rel=1e-5)

    # Stage 2: the confirmation's lambdas, the best of them on validation data loss, its test loss.
    runs = result["results"]
    assert tuple(r["l2"] for r in runs) == confirmation(result["lambda_estimate"], (1e-2, 1e1))
    finals = {r["l2"]: r["history"]["val_data_loss"][-1] for r in runs}
    assert result["best_lambda"] == min(finals, key=finals.get)
    assert result["best_val_data_loss"] == min(finals.values())
    best = next(r for r in runs if r["l2"] == result["best_lambda"])
    assert result["test_data_loss"] == best["test_data_loss"] is not None

    client = mlflow.MlflowClient(store)
    parent = client.get_run(result["parent_run_id"])
    for key in ("best_lambda", "best_val_data_loss", "test_data_loss", "cost_in_runs"):
        assert parent.data.metrics[key] == pytest.approx(result[key]), key
    steps = [(m.step, m.value) for m in client.get_metric_history(parent.info.run_id, "lambda")]
    assert sorted(steps) == [(1, pytest.approx(result["lambda_estimate"])), (2, result["best_lambda"])]
    kids = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(kids) == 1 + len(runs) and all(k.info.status == "FINISHED" for k in kids)
    first = next(k for k in kids if k.data.tags["tune.stage"].startswith("1"))
    assert first.data.params["l2.route"] == "regularizer"  # the chosen route, in stage 1 too
    logged = sorted((m.step, m.value) for m in client.get_metric_history(first.info.run_id, "lambda"))
    assert logged[1:] == [(epoch, pytest.approx(l2)) for epoch, l2, _ in path]  # step 0: the starting lambda
    assert client.get_metric_history(first.info.run_id, "step/lambda")  # per step too, with log_every_n_steps
    # Keras validates stage 1 every 4th of its 12 epochs (its hypergradient reads the validation split itself).
    assert len(client.get_metric_history(first.info.run_id, "val_data_loss")) == 3
    assert len(client.get_metric_history(first.info.run_id, "data_loss")) == 12
    assert all("val_data_loss" in k.data.metrics for k in kids)
    assert result["cost_in_runs"] > 0 and "cost_in_runs" in result["report"]


@pytest.mark.mlflow
def test_the_command_line_tunes_a_users_npz_and_prints_json(tmp_path, capsys):
    from keras_l2.cli import main

    x, y = data(examples=40, inputs=5, seed=0)
    x_val, y_val = data(examples=20, inputs=5, seed=1)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y.argmax(1), x_val=x_val, y_val=y_val.argmax(1),
             x_test=x_val[:10], y_test=y_val[:10].argmax(1))
    assert main(["tune", "--data", str(tmp_path / "d.npz"), "--hidden", "8", "--layers", "", "--epochs", "2",
                 "--range", "1e-2,1", "--json", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["confirmation"]) == {f"{v}" for v in confirmation(result["lambda_estimate"], (1e-2, 1.0))}
    assert result["confirmation"][str(result["best_lambda"])] == result["best_val_data_loss"]
    assert result["test_data_loss"] > 0 and result["cost_in_runs"] > 0 and len(result["trajectory"]) == 2
