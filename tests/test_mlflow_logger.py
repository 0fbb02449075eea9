"""MlflowL2Logger, read back through MlflowClient from a real SQLite store."""

import logging
import subprocess
import sys
import textwrap

import keras
import mlflow
import numpy as np
import pytest

from keras_l2 import LambdaScheduler, MlflowL2Logger, select_layers
from keras_l2.tracking.names import sanitize, unique_keys
from tests.helpers import ROUTES, compile_route, data, mlp, reported_rtol, sqlite_store, weights

LAMBDA = 0.2


@pytest.fixture
def store_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)
    yield sqlite_store(tmp_path)
    mlflow.set_tracking_uri(None)


def _history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


class _Norms(keras.callbacks.Callback):
    """Records every Dense kernel's norm after each step, from the model itself."""

    def __init__(self):
        super().__init__()
        self.by_step = {}
        self.step = 0

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        self.by_step[self.step] = {layer.name: float(np.linalg.norm(keras.ops.convert_to_numpy(layer.kernel)))
                                   for layer in self.model.layers}


@pytest.mark.core
@pytest.mark.parametrize("route", (*ROUTES, "none"))
def test_every_metric_and_param_is_in_the_store(float64, store_uri, route):
    x, y = data(25)
    xv, yv = data(10, seed=3)
    model = mlp()
    chosen = ["out"] if route in ("coupled", "decoupled") else ["hidden", "out"]
    compile_route(model, route, keras.optimizers.Adam(0.05), LAMBDA, 25, select_layers(model, names=chosen),
                  metrics=["accuracy"])
    logger = MlflowL2Logger(tracking_uri=store_uri, log_every_n_steps=2, verbose=0)
    norms = _Norms()
    history = model.fit(x, y, batch_size=10, epochs=3, shuffle=False, verbose=0, validation_data=(xv, yv),
                        callbacks=[logger, norms]).history
    client = mlflow.MlflowClient(store_uri)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    expected_route = {"coupled": "optimizer", "decoupled": "optimizer"}.get(route, route)
    assert params["l2.route"] == expected_route
    assert params["l2.mode"] == {"regularizer": "penalty", "loss": "penalty"}.get(route, route)
    assert float(params["l2.lambda"]) == (0.0 if route == "none" else LAMBDA)
    assert params["l2.n"] == ("1" if route == "none" else "25")
    assert params["l2.layers"] == ("" if route == "none" else ",".join(chosen))
    assert params["model.params"] == str(model.count_params())
    assert params["optimizer.learning_rate"] == "0.05"
    assert params["optimizer.class"] == ("L2DecayOptimizer(Adam)" if route in ("coupled", "decoupled") else "Adam")
    regularized = {"hidden": route not in ("none", "coupled", "decoupled"), "out": route != "none"}
    for layer, flag in regularized.items():
        assert run.data.tags[f"l2.regularized/{layer}"] == str(flag).lower()

    epoch_keys = ["loss", "accuracy", "data_loss", "l2_penalty", "val_loss", "val_accuracy", "val_data_loss",
                  "val_l2_penalty"]
    for key in epoch_keys:
        logged = _history(client, run.info.run_id, key)
        assert [step for step, _ in logged] == [1, 2, 3], key  # once per epoch, none duplicated
        np.testing.assert_allclose([v for _, v in logged], history[key], rtol=1e-12, err_msg=key)
    for prefix in ("", "val_"):
        regularized_loss = [v for _, v in _history(client, run.info.run_id, prefix + "regularized_loss")]
        np.testing.assert_allclose(regularized_loss, np.add(history[prefix + "data_loss"],
                                                            history[prefix + "l2_penalty"]), rtol=1e-14)
    if route in ("regularizer", "loss"):
        np.testing.assert_allclose(history["loss"], np.add(history["data_loss"], history["l2_penalty"]),
                                   rtol=max(1e-14, reported_rtol()))
    else:
        np.testing.assert_allclose(history["loss"], history["data_loss"], rtol=max(1e-14, reported_rtol()))
    lam = 0.0 if route == "none" else LAMBDA
    assert _history(client, run.info.run_id, "lambda") == [(0, lam), (1, lam), (2, lam), (3, lam)]

    # Norms: step 0 is the initial kernel, the last the final one; every 2
    # optimizer steps (3 per epoch) the kernel of that step.
    for layer in ("hidden", "out"):
        logged = _history(client, run.info.run_id, f"weight_norm/{layer}")
        assert [step for step, _ in logged] == [0, 1, 2, 3]
        final = np.linalg.norm(keras.ops.convert_to_numpy(model.get_layer(layer).kernel))
        np.testing.assert_allclose(logged[-1][1], final, rtol=1e-12)
        by_step = _history(client, run.info.run_id, f"step/weight_norm/{layer}")
        assert [step for step, _ in by_step] == [2, 4, 6, 8]
        np.testing.assert_allclose([v for _, v in by_step], [norms.by_step[s][layer] for s, _ in by_step], rtol=1e-12)
    assert [step for step, _ in _history(client, run.info.run_id, "step/loss")] == [2, 4, 6, 8]


@pytest.mark.core
@pytest.mark.parametrize("route", ROUTES)
def test_lambda_schedule_is_logged_as_used(float64, store_uri, route):
    x, y = data(24)
    model = mlp()
    w0 = weights(model)
    compile_route(model, route, keras.optimizers.SGD(0.1), LAMBDA, 24, select_layers(model))
    logger = MlflowL2Logger(tracking_uri=store_uri, verbose=0)
    schedule = [0.0, 0.1, 0.4]
    # The scheduler listed after the logger: the logger must still see the
    # lambda that the epoch's steps used.
    model.fit(x, y, batch_size=24, epochs=3, shuffle=False, verbose=0,
              callbacks=[logger, LambdaScheduler(schedule)])
    client = mlflow.MlflowClient(store_uri)
    assert _history(client, logger.run_id, "lambda") == [(0, LAMBDA), (1, 0.0), (2, 0.1), (3, 0.4)]
    from tests.helpers import reference_gd

    penalties = [v for _, v in _history(client, logger.run_id, "l2_penalty")]
    for epoch, lam in enumerate(schedule):
        start = reference_gd(w0, x, y, 0.1, 24, schedule[:epoch])
        expected = lam / 24 * sum(float((w**2).sum()) for w in start[0::2])
        np.testing.assert_allclose(penalties[epoch], expected, rtol=max(1e-10, reported_rtol()))


def test_nested_runs_under_an_active_parent(store_uri):
    x, y = data(24)
    mlflow.set_tracking_uri(store_uri)
    with mlflow.start_run(run_name="sweep") as parent:
        ids = []
        for lam in (0.0, 0.1):
            model = mlp()
            compile_route(model, "regularizer", "sgd", lam, 24, select_layers(model))
            logger = MlflowL2Logger(nested=True, run_name=f"l2={lam}", tags={"sweep": "demo"}, verbose=0)
            model.fit(x, y, epochs=2, verbose=0, callbacks=[logger])
            ids.append(logger.run_id)
    client = mlflow.MlflowClient(store_uri)
    for run_id, lam in zip(ids, (0.0, 0.1), strict=True):
        run = client.get_run(run_id)
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["sweep"] == "demo"
        assert run.info.run_name == f"l2={lam}"
        assert run.info.status == "FINISHED"
        assert float(run.data.params["l2.lambda"]) == lam
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


def test_logs_into_the_active_run_and_leaves_it_open(store_uri):
    x, y = data(24)
    mlflow.set_tracking_uri(store_uri)
    model = mlp()
    compile_route(model, "loss", "sgd", LAMBDA, 24, select_layers(model))
    with mlflow.start_run() as active:
        logger = MlflowL2Logger(verbose=0)
        model.fit(x, y, epochs=2, verbose=0, callbacks=[logger])
        client = mlflow.MlflowClient(store_uri)
        assert logger.run_id == active.info.run_id
        assert client.get_run(active.info.run_id).info.status == "RUNNING"
        assert [s for s, _ in _history(client, active.info.run_id, "l2_penalty")] == [1, 2]


class _Boom(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise RuntimeError("boom")


@pytest.mark.core  # on JAX and PyTorch the fit after a failed one once called a None step function
def test_a_failed_fit_marks_the_run_failed(store_uri):
    x, y = data(24)
    model = mlp()
    compile_route(model, "regularizer", "sgd", LAMBDA, 24, select_layers(model))
    with pytest.raises(RuntimeError, match="boom"), MlflowL2Logger(tracking_uri=store_uri, verbose=0) as logger:
        model.fit(x, y, epochs=4, verbose=0, callbacks=[logger, _Boom()])
    client = mlflow.MlflowClient(store_uri)
    assert client.get_run(logger.run_id).info.status == "FAILED"
    assert [s for s, _ in _history(client, logger.run_id, "loss")] == [1, 2]  # what was logged is kept
    assert "compute_loss" not in vars(model)  # the metrics are detached again

    # Without a `with` block: the logger's next fit closes the failed run.
    again = MlflowL2Logger(tracking_uri=store_uri, verbose=0)
    with pytest.raises(RuntimeError, match="boom"):
        model.fit(x, y, epochs=4, verbose=0, callbacks=[again, _Boom()])
    failed = again.run_id
    model.fit(x, y, epochs=1, verbose=0, callbacks=[again])
    assert client.get_run(failed).info.status == "FAILED"
    assert client.get_run(again.run_id).info.status == "FINISHED"


def test_a_process_that_dies_in_fit_leaves_a_failed_run(tmp_path):
    script = textwrap.dedent(f"""
        import keras, numpy as np
        from keras_l2 import MlflowL2Logger, regularize
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
        regularize(model, l2=0.1)
        model.compile(optimizer="sgd", loss="categorical_crossentropy")
        logger = MlflowL2Logger(tracking_uri="sqlite:///{tmp_path}/store.db", verbose=0)
        class Boom(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                print("RUN", logger.run_id, flush=True)
                raise SystemExit(3)
        model.fit(np.ones((8, 4)), np.eye(3)[[0, 1, 2] * 2 + [0, 1]], epochs=3, verbose=0, callbacks=[logger, Boom()])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 3, done.stderr
    run_id = done.stdout.split("RUN ")[1].split()[0]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/store.db")
    assert client.get_run(run_id).info.status == "FAILED"
    assert [s for s, _ in _history(client, run_id, "loss")] == [1]


def test_embedded_default_store_under_mlruns(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(None)
    model = mlp()
    compile_route(model, "regularizer", "sgd", LAMBDA, 24, select_layers(model))
    logger = MlflowL2Logger(verbose=0)
    model.fit(*data(24), epochs=1, verbose=0, callbacks=[logger])
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    run = client.get_run(logger.run_id)
    assert client.get_experiment(run.info.experiment_id).name == "keras_l2"
    assert run.info.artifact_uri.startswith((tmp_path / "mlruns" / "artifacts").as_uri())
    assert not (tmp_path / "mlflow.db").exists()


def test_layer_names_mlflow_forbids_are_sanitized(store_uri):
    keras.utils.set_random_seed(0)
    names = ["a>b", "a_b", "dense"]  # ">": TensorFlow allows it, MLflow does not; "a_b" collides
    model = keras.Sequential([keras.Input((4,))] + [keras.layers.Dense(3, name=n) for n in names[:2]]
                             + [keras.layers.Dense(3, activation="softmax", name=names[2])])
    compile_route(model, "regularizer", "sgd", LAMBDA, 1, select_layers(model))
    logger = MlflowL2Logger(tracking_uri=store_uri, verbose=0)
    model.fit(np.ones((6, 4)), np.eye(3)[[0, 1, 2] * 2], epochs=1, verbose=0, callbacks=[logger])
    metrics = mlflow.MlflowClient(store_uri).get_run(logger.run_id).data.metrics
    assert {"weight_norm/a_b", "weight_norm/a_b_2", "weight_norm/dense"} <= set(metrics)
    np.testing.assert_allclose(metrics["weight_norm/a_b_2"],
                               np.linalg.norm(keras.ops.convert_to_numpy(model.layers[1].kernel)), rtol=1e-6)


@pytest.mark.parametrize("name", ["a b", "x/../y", "./z", "/lead", "trail/", "a//b", "..", ".", "é", "k" * 300,
                                  "tab\there", "semi;colon", "c:d"])
def test_sanitized_keys_pass_mlflow_validation(name):
    from mlflow.utils.validation import _validate_metric_name, _validate_param_name

    key = sanitize(f"weight_norm/{name}")
    _validate_metric_name(key)
    _validate_param_name(key)
    assert len(unique_keys([name, name, name])) == 3


def test_model_without_a_route_is_a_logged_baseline(store_uri, caplog):
    model = mlp()
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    logger = MlflowL2Logger(tracking_uri=store_uri, verbose=0)
    with caplog.at_level(logging.WARNING, logger="keras_l2"):
        model.fit(*data(24), epochs=1, verbose=0, callbacks=[logger])
    assert "uses no keras_l2 route" in caplog.text
    run = mlflow.MlflowClient(store_uri).get_run(logger.run_id)
    assert run.data.params["l2.route"] == "none"
    assert run.data.metrics["l2_penalty"] == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tracking_uri": "not a uri"}, "Unsupported MLflow tracking URI scheme"),
        ({"tracking_uri": "http://:5000"}, "needs a host"),
        ({"tracking_uri": "http://localhost:99999"}, "Bad port"),
        ({"tracking_uri": "sqlite://relative.db"}, "needs a file path"),
        ({"experiment_name": ""}, "experiment_name"),
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
        ({"log_every_n_steps": 2.5}, "log_every_n_steps"),
        ({"max_delay": -1}, "max_delay"),
        ({"max_delay": float("nan")}, "max_delay"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MlflowL2Logger(**kwargs)


def test_unwritable_mlruns_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)
    monkeypatch.chdir(tmp_path)
    # A file where the directory should be: unwritable even for root.
    (tmp_path / "mlruns").write_text("not a directory")
    with pytest.raises(ValueError, match="writable directory"):
        MlflowL2Logger()


def test_disagreeing_lambdas_are_refused_before_any_step(store_uri):
    from keras_l2 import L2DecayOptimizer, regularize

    model = mlp()
    regularize(model, l2=0.1, layers=select_layers(model, names=["hidden"]))
    optimizer = L2DecayOptimizer(keras.optimizers.SGD(), l2=0.2, layers=select_layers(model, names=["out"]))
    model.compile(optimizer=optimizer, loss="categorical_crossentropy")
    before = weights(model)
    with pytest.raises(ValueError, match="different lambdas"):
        model.fit(*data(24), epochs=1, verbose=0, callbacks=[MlflowL2Logger(tracking_uri=store_uri, verbose=0)])
    for old, new in zip(before, weights(model), strict=True):
        np.testing.assert_array_equal(old, new)
    assert "compute_loss" not in vars(model)


def test_loggers_of_one_model_share_one_compiled_norm_reader(store_uri):
    """A logger per fit (a sweep, or fit in a loop) must not recompile the norms each time."""
    x, y = data(12)
    model = mlp()
    compile_route(model, "coupled", keras.optimizers.SGD(0.1), LAMBDA, 12, select_layers(model))
    loggers = [MlflowL2Logger(tracking_uri=store_uri, max_delay=60, verbose=0) for _ in range(3)]
    traces = []
    for logger in loggers:
        model.fit(x, y, epochs=1, verbose=0, callbacks=[logger])
        if keras.backend.backend() == "tensorflow":
            traces.append(logger._norms._fn.experimental_get_tracing_count())
    assert loggers[0]._norms is loggers[1]._norms is loggers[2]._norms
    if keras.backend.backend() == "tensorflow":  # (the count includes other tests' shapes, in this process)
        assert traces[0] == traces[1] == traces[2], traces
    other = mlp()
    compile_route(other, "coupled", keras.optimizers.SGD(0.1), LAMBDA, 12, select_layers(other))
    logger = MlflowL2Logger(tracking_uri=store_uri, max_delay=60, verbose=0)
    other.fit(x, y, epochs=1, verbose=0, callbacks=[logger])
    assert logger._norms is not loggers[0]._norms and logger._norms.kernels[0] is other.layers[0].kernel
