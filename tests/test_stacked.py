"""Stacked sweeps: every member equals its separately trained run, and what would couple members is refused."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from keras_l2 import apply_route, attach_l2_metrics, detach_l2_metrics, select_layers
from keras_l2.search.config import SweepConfig, check_config
from keras_l2.search.stacked import member_logs
from keras_l2.search.stacking import stack_models
from tests.helpers import ROUTES, data, reported_rtol

OPTIMIZERS = {
    "sgd_momentum": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(0.01),
}
N, EPOCHS, BATCH = 40, 3, 10  # 4 steps an epoch: 12 optimizer steps


def deep_mlp():
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(7, activation="tanh", name="first")(inputs)
    hidden = keras.layers.Dense(6, activation="relu", name="second")(hidden)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="out")(hidden))


def noisy_mlp():
    """Dropout (per-member seed generators) and BatchNormalization (per-member statistics).

    On PyTorch Keras draws the masks of an unseeded Dropout from torch's global
    generator, which the members share; a seeded Dropout draws from its own.
    """
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(8, activation="relu", name="first")(inputs)
    hidden = keras.layers.BatchNormalization()(hidden)
    hidden = keras.layers.Dropout(0.3, seed=7 if keras.backend.backend() == "torch" else None)(hidden)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="out")(hidden))


def separate_run(build, route, optimizer, l2, seed, x, y, validation):
    """The run a member stands for, trained alone the way a sweep trains it."""
    keras.utils.clear_session()
    keras.utils.set_random_seed(seed)
    model = build()
    optimizer, loss = apply_route(model, route, optimizer, l2, N, select_layers(model))
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
    attach_l2_metrics(model)
    keras.utils.set_random_seed(1000)
    history = model.fit(x, y, epochs=EPOCHS, batch_size=BATCH, validation_data=validation, verbose=0).history
    return model, history


def stacked_run(build, route, optimizer, lambdas, seed, x, y, validation):
    stack = stack_models(build, lambdas, seed, route=route, n=N, optimizer=optimizer)
    for member in stack.members:
        attach_l2_metrics(member.model)
    keras.utils.set_random_seed(1000)
    history = stack.fit(x, y, epochs=EPOCHS, batch_size=BATCH, validation_data=validation, verbose=0).history
    return stack, history


def assert_same_run(member_model, member_history, model, history):
    for ours, theirs in zip(member_model.weights, model.weights, strict=True):
        ours, theirs = keras.ops.convert_to_numpy(ours), keras.ops.convert_to_numpy(theirs)
        np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-10 * np.abs(theirs).max())
    assert set(member_history) == set(history), (sorted(member_history), sorted(history))
    for key in history:
        np.testing.assert_allclose(member_history[key], history[key], rtol=1e-10, atol=0, err_msg=key)


@pytest.mark.core
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("route", ROUTES)
def test_every_member_equals_its_separate_run(float64, route, optimizer):
    x, y = data(N, inputs=5)
    validation = None  # (validation logs: the Dropout test below, and the MLflow test)
    lambdas = (0.0, 2.0)
    stack, history = stacked_run(deep_mlp, route, OPTIMIZERS[optimizer], lambdas, 3, x, y, validation)
    assert len(history["loss"]) == EPOCHS
    for index, l2 in enumerate(lambdas):
        model, alone = separate_run(deep_mlp, route, OPTIMIZERS[optimizer](), l2, 3, x, y, validation)
        assert_same_run(stack.members[index].model, member_logs(history, index), model, alone)
        assert "l2_penalty" in alone and "data_loss" in alone
    # The members really differ: lambda reached each one.
    first, second = (keras.ops.convert_to_numpy(m.model.layers[1].kernel) for m in stack.members)
    assert np.abs(first - second).max() > 1e-3
    # The stack's own loss is the members' sum (the objective it differentiates); torch reports through float32.
    total = sum(np.asarray(member_logs(history, k)["loss"]) for k in range(len(lambdas)))
    np.testing.assert_allclose(history["loss"], total, rtol=reported_rtol())


@pytest.mark.core
def test_dropout_and_batch_normalization_members_equal_their_separate_runs(float64):
    x, y = data(N, inputs=5)
    validation = data(12, inputs=5, seed=1)
    stack, history = stacked_run(noisy_mlp, "regularizer", OPTIMIZERS["adam"], (0.0, 1.0), 5, x, y, validation)
    for index, l2 in enumerate((0.0, 1.0)):
        model, alone = separate_run(noisy_mlp, "regularizer", OPTIMIZERS["adam"](), l2, 5, x, y, validation)
        assert "val_data_loss" in alone and "val_accuracy" in alone
        # All weights, the moving mean and variance included: no member saw another's activations.
        assert_same_run(stack.members[index].model, member_logs(history, index), model, alone)


def count_train_step_traces(model) -> list:
    """Calls of `model.train_step`: on TensorFlow, one per trace of the compiled step."""
    calls, own = [], model.train_step

    def counted(data):
        calls.append(data)
        return own(data)

    model.train_step = counted
    return calls


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="a second trace of one shape is TensorFlow's (PyTorch calls train_step every step, JAX "
                           "traces per batch shape)")
def test_a_stack_and_a_sweeps_run_trace_their_train_step_once():
    # Keras on TensorFlow builds the metrics and optimizer inside the first trace, and a tf.function whose first
    # trace made variables traces again.
    from keras_l2.search.models import build_run, compile_run

    x, y = data(N + 5, inputs=5)  # (a last, partial batch too)
    run = build_run(deep_mlp, 3)
    compile_run(run, 0.5, route="decoupled", n=N, layers=None)
    stack = stack_models(deep_mlp, (0.0, 2.0), 3, route="loss", n=N)
    for model in (run, stack):
        assert model.optimizer.built
        traces = count_train_step_traces(model)
        model.fit(x, y, epochs=2, batch_size=BATCH, verbose=0)
        assert len(traces) == 1, model.name


def test_member_logs_takes_one_members_keys_and_validation_keys():
    logs = {"loss": 3.0, "member_0/loss": 1.0, "member_1/loss": 2.0, "val_member_1/accuracy": 0.5,
            "member_10/loss": 9.0}
    assert member_logs(logs, 1) == {"loss": 2.0, "val_accuracy": 0.5}
    assert member_logs(logs, 10) == {"loss": 9.0}


@pytest.mark.parametrize("optimizer, message", [
    (lambda: keras.optimizers.Adam(global_clipnorm=1.0), "global_clipnorm=1.0 clips by one norm"),
    (lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam()), "loss scaling"),
    (lambda: keras.optimizers.SGD(loss_scale_factor=128.0), "loss scaling"),
    (lambda: "adam", "must return a keras.optimizers.Optimizer"),
])
def test_optimizers_that_would_couple_members_are_refused(optimizer, message):
    with pytest.raises(ValueError, match=message):
        stack_models(deep_mlp, (0.0, 1.0), route="coupled", n=N, optimizer=optimizer)


@pytest.mark.parametrize("lambdas, message", [
    ((), "give at least one"),
    ((0.0, -1.0), "-1.0"),
    ((0.0, math.nan), "nan"),
    ((0.1, 0.1), r"repeated \(λ, seed\) members \['0.1'\]"),
])
def test_bad_lambda_lists_are_refused(lambdas, message):
    with pytest.raises(ValueError, match=message):
        stack_models(deep_mlp, lambdas, route="regularizer", n=N)


def test_a_build_function_whose_architecture_changes_is_refused():
    widths = iter((7, 9))

    def changing():
        inputs = keras.Input((5,))
        hidden = keras.layers.Dense(next(widths), name="first")(inputs)
        return keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="out")(hidden))

    with pytest.raises(ValueError, match=r"another architecture for λ=1 than for λ=0 \(layer 'first' Dense"):
        stack_models(changing, (0.0, 1.0), route="regularizer", n=N)


@pytest.mark.parametrize("lambdas, message", [((0.1, 0.1), r"repeated \(λ, seed\) members \['0.1'\]"),
                                              ((), "give at least one lambda")])
def test_a_sweep_config_with_no_or_repeated_lambdas_is_refused_before_any_run(lambdas, message):
    # The library's config, not only the command line: a stack would refuse them after the parent run exists.
    with pytest.raises(ValueError, match=r"--lambdas: " + message):
        check_config(SweepConfig(lambdas=lambdas))


@pytest.mark.parametrize("size", [0, -2, 1.5, True])
def test_a_stack_size_below_one_is_refused(size):
    with pytest.raises(ValueError, match=r"--stack-size: must be an integer >= 1"):
        check_config(SweepConfig(stack_size=size))


def test_member_callbacks_need_one_list_per_member():
    stack = stack_models(deep_mlp, (0.0, 1.0), route="regularizer", n=N)
    x, y = data(N, inputs=5)
    with pytest.raises(ValueError, match=r"one list per member \(2\)"):
        stack.fit(x, y, epochs=1, verbose=0, member_callbacks=[[]])


class _Metrics(keras.callbacks.Callback):
    """A member callback that puts the in-step metrics on its member for one `fit`, as a logger does."""

    def on_train_begin(self, logs=None):
        attach_l2_metrics(self.model)

    def on_train_end(self, logs=None):
        detach_l2_metrics(self.model)


@pytest.mark.core
@pytest.mark.parametrize("first", ["fit", "evaluate"])
def test_a_second_fit_with_member_metrics_reports_them_as_one_longer_fit_does(float64, first):
    """The stack's step calls its members' metrics hooks: steps traced before they were attached must not serve."""
    x, y = data(N, inputs=5)

    def stack():
        return stack_models(deep_mlp, (0.0, 1.0), route="regularizer", n=N)

    def with_metrics():
        return [[_Metrics()], [_Metrics()]]

    again = stack()
    if first == "fit":
        again.fit(x, y, epochs=1, batch_size=BATCH, shuffle=False, verbose=0)  # no member callbacks
    else:
        again.evaluate(x, y, verbose=0)
        again.fit(x, y, epochs=1, batch_size=BATCH, shuffle=False, verbose=0, member_callbacks=with_metrics())
    second = again.fit(x, y, epochs=1, batch_size=BATCH, shuffle=False, verbose=0, validation_data=(x, y),
                       member_callbacks=with_metrics()).history
    longer = stack().fit(x, y, epochs=2, batch_size=BATCH, shuffle=False, verbose=0, validation_data=(x, y),
                         member_callbacks=with_metrics()).history
    for k in range(2):
        ours, theirs = member_logs(second, k), member_logs(longer, k)
        for key in ("l2_penalty", "data_loss", "val_l2_penalty", "val_data_loss"):
            np.testing.assert_allclose(ours[key][0], theirs[key][1], rtol=1e-10, err_msg=f"member {k}: {key}")
    # And back: once the member callbacks are gone, an evaluate reports what a stack without them reports.
    plain = stack().evaluate(x, y, verbose=0, return_dict=True)
    assert sorted(again.evaluate(x, y, verbose=0, return_dict=True)) == sorted(plain)


@pytest.mark.core
def test_an_evaluate_after_attaching_a_members_metrics_reports_them(float64):
    """A stack whose test step was traced before a member's metrics were attached must not report zeros."""
    x, y = data(N, inputs=5)
    stack = stack_models(deep_mlp, (0.0, 1.0), route="regularizer", n=N)
    stack.evaluate(x, y, verbose=0)
    attach_l2_metrics(stack.towers[1])
    reported = stack.evaluate(x, y, verbose=0, return_dict=True)
    member = stack.towers[1]
    expected = member.evaluate(x, y, verbose=0, return_dict=True)
    assert reported["member_1/l2_penalty"] > 0
    np.testing.assert_allclose(reported["member_1/l2_penalty"], expected["l2_penalty"], rtol=1e-10)


def two_layer_model():
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(16, activation="relu", name="wide")(inputs)
    hidden = keras.layers.Dropout(0.2)(hidden)
    hidden = keras.layers.Dense(16, activation="relu", name="narrow")(hidden)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="head")(hidden))


@pytest.mark.mlflow
def test_stacked_members_log_exactly_what_their_separate_runs_log(tmp_path):
    import mlflow

    from keras_l2.search import run_sweep
    from tests.helpers import sqlite_store, user_data

    store = sqlite_store(tmp_path)
    client = mlflow.MlflowClient(store)
    logged, tables = {}, {}
    for stacked in (True, False):
        config = SweepConfig(lambdas=(0.0, 0.5, 2.0), layers="wide,narrow", epochs=3, batch_size=16,
                             learning_rate=1e-2, seeds=2, stacked=stacked, stack_size=2, tracking_uri=store,
                             experiment=f"stacked={stacked}", results_dir=str(tmp_path / str(stacked)), verbose=0)
        result = run_sweep(config, model=two_layer_model, data=user_data())
        tables[stacked] = result["table"]
        runs = {}
        for result_run in result["results"]:
            run = client.get_run(result_run["run_id"])
            assert run.data.tags["mlflow.parentRunId"] == result["parent_run_id"]
            histories = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
                         for key in run.data.metrics}
            tags = {k: v for k, v in run.data.tags.items()
                    if not k.startswith("mlflow.") and k != "keras_l2.run_key"}  # (each run's own key)
            runs[(result_run["l2"], result_run["seed"])] = (run.info.run_name, run.data.params, tags, histories)
        logged[stacked] = runs
        parent = client.get_run(result["parent_run_id"])
        assert parent.data.params["sweep.stacked"] == str(stacked)
    assert sorted(logged[True]) == sorted(logged[False]) and len(logged[True]) == 6
    for member, (name, params, tags, histories) in logged[True].items():
        alone_name, alone_params, alone_tags, alone_histories = logged[False][member]
        assert (name, params, tags) == (alone_name, alone_params, alone_tags), member
        assert sorted(histories) == sorted(alone_histories) and "weight_norm/wide" in histories, member
        assert {"lambda", "l2_penalty", "data_loss", "val_data_loss", "loss", "val_accuracy"} <= set(histories)
        for key, history in histories.items():
            steps, values = zip(*history, strict=True)
            alone_steps, alone_values = zip(*alone_histories[key], strict=True)
            assert steps == alone_steps, key
            np.testing.assert_allclose(values, alone_values, rtol=1e-10, err_msg=f"{member} {key}")
    assert tables[True] == tables[False]


def test_the_command_line_has_both_flags_and_refuses_a_stack_size_below_one(tmp_path, monkeypatch, capsys):
    from keras_l2.cli import main
    from keras_l2.search.command import config_from_args, parser

    assert config_from_args(parser().parse_args([])).stacked is True  # the default
    assert config_from_args(parser().parse_args(["--no-stacked"])).stacked is False
    assert config_from_args(parser().parse_args(["--stacked", "--stack-size", "3"])).stack_size == 3
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", "--stack-size", "0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["keras-l2 sweep: error: --stack-size: must be an integer >= 1 (members per "
                                        "stack). Received: 0"]
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.mlflow
def test_member_callbacks_that_work_per_batch_are_refused(tmp_path):
    from keras_l2 import MlflowL2Logger

    class PerBatch(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            pass

    stack = stack_models(deep_mlp, (0.0, 1.0), route="regularizer", n=N)
    x, y = data(N, inputs=5)
    with pytest.raises(ValueError, match="PerBatch works per batch"):
        stack.fit(x, y, epochs=1, verbose=0, member_callbacks=[[PerBatch()], []])
    stepping = MlflowL2Logger(tracking_uri=f"sqlite:///{tmp_path}/m.db", log_every_n_steps=2, verbose=0)
    with pytest.raises(ValueError, match="leave log_every_n_steps unset"):
        stack.fit(x, y, epochs=1, verbose=0, member_callbacks=[[stepping], []])


def test_the_default_stack_size_gives_every_worker_a_stack_and_stack_size_caps_it(tmp_path):
    from keras_l2.search import prepare_sweep
    from tests.helpers import sqlite_store, user_data

    def sweep(**options):
        config = SweepConfig(lambdas=(0.0, 0.1, 1.0, 3.0, 10.0), layers=None, tracking_uri=sqlite_store(tmp_path),
                             verbose=0, **options)
        return prepare_sweep(config, model=two_layer_model, data=user_data())

    assert sweep().stack_size == 5 and "free on" in sweep().stack_reason  # memory allows all five here
    assert (sweep(workers=2).stack_size, sweep(workers=2).stack_reason) == (
        3, "3 members per stack, so that each of the 2 workers trains one")
    assert sweep(workers=2, seeds=2).stack_size == 5  # two seeds: a stack each
    assert sweep(stack_size=2).stack_size == 2 and sweep(stack_size=9).stack_size == 5
