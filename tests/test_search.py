"""Sweeps of the user's own model (library API and `--model`), its bad input, and the parent run's delivery."""

import json
import re
import textwrap
import time
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest

from keras_l2.cli import main
from keras_l2.search import SweepConfig, prepare_sweep, run_sweep
from tests.helpers import sqlite_store, user_data
from tests.mlflow_server import MlflowServer, free_port

LAMBDAS = (0.0, 1.0)
CHOSEN = ("wide", "narrow")


@pytest.fixture
def store(tmp_path) -> str:
    """A new, empty store in this test's directory (where `config` points)."""
    return sqlite_store(tmp_path, "mlflow.db")


def user_model(inputs: int = 8, classes: int = 3):
    """The user's functional model: three Dense layers and a Dropout."""
    x = keras.Input((inputs,))
    h = keras.layers.Dense(16, activation="relu", name="wide")(x)
    h = keras.layers.Dropout(0.2)(h)
    h = keras.layers.Dense(16, activation="relu", name="narrow")(h)
    return keras.Model(x, keras.layers.Dense(classes, activation="softmax", name="head")(h), name="user_net")


def config(tmp_path, **overrides) -> SweepConfig:
    values = {"lambdas": LAMBDAS, "layers": ",".join(CHOSEN), "epochs": 3, "batch_size": 16, "learning_rate": 1e-2,
              "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "results_dir": str(tmp_path / "results"),
              "spool_dir": str(tmp_path / "spool"), "verbose": 0}
    return SweepConfig(**{**values, **overrides})


def children(store: str, parent_id: str) -> list:
    client = mlflow.MlflowClient(store)
    parent = client.get_run(parent_id)
    return client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def check_user_sweep(store: str, parent_id: str, table: str, by_lambda: dict) -> None:
    """One finished child per lambda, the chosen layers' norms fall with lambda, the table names the layers."""
    runs = children(store, parent_id)
    assert sorted(float(r.data.params["l2.lambda"]) for r in runs) == list(LAMBDAS)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(r.data.params["l2.layers"] == ",".join(CHOSEN) for r in runs), [r.data.params for r in runs]
    for layer in CHOSEN:
        norms = [by_lambda[l2]["norms"][layer] for l2 in LAMBDAS]
        assert norms[1] < 0.9 * norms[0], (layer, norms)
    header = table.split("\n")[0]
    assert header.split("|W|_F")[1:] == [" wide*    ", " narrow*       ", " head"], header


def test_sweep_of_a_users_functional_model_through_the_library(tmp_path, store):
    result = run_sweep(config(tmp_path), model=user_model, data=user_data())
    check_user_sweep(store, result["parent_run_id"], result["table"], result["by_lambda"])
    parent = mlflow.MlflowClient(store).get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["sweep.model"] == "user_model"


def test_sweep_of_a_users_model_through_the_command_line(tmp_path, store, monkeypatch, capsys):
    module = f"models_{tmp_path.name}"  # a fresh module name: not one an earlier test imported
    (tmp_path / f"{module}.py").write_text(textwrap.dedent('''
        import keras

        def build():
            x = keras.Input((8,))
            h = keras.layers.Dense(16, activation="relu", name="wide")(x)
            h = keras.layers.Dropout(0.2)(h)
            h = keras.layers.Dense(16, activation="relu", name="narrow")(h)
            return keras.Model(x, keras.layers.Dense(3, activation="softmax", name="head")(h))
    '''))
    np.savez(tmp_path / "data.npz", **dict(zip(("x_train", "y_train", "x_val", "y_val"), user_data(), strict=True)))
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "--model", f"{module}:build", "--data", "data.npz", "--layers", "wide,narrow",
                 "--lambdas", "0,1", "--epochs", "3", "--batch-size", "16", "--learning-rate", "0.01",
                 "--tracking-uri", store, "--results-dir", "results"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("   lambda"):]
    parent_id = out.split("parent run ")[1].split()[0]
    by_lambda = {float(row.split()[0]): {"norms": dict(zip(("wide", "narrow", "head"), map(float, row.split()[4:7]),
                                                           strict=True))}
                 for row in table.splitlines()[1:3]}
    check_user_sweep(store, parent_id, table, by_lambda)


def test_a_tf_data_sweep_takes_n_from_the_dataset(tmp_path, store):
    import tensorflow as tf

    x_train, y_train, x_val, y_val = user_data(examples=60)
    train = tf.data.Dataset.from_tensor_slices((x_train, np.eye(3, dtype="float32")[y_train])).batch(16)
    val = tf.data.Dataset.from_tensor_slices((x_val, np.eye(3, dtype="float32")[y_val])).batch(16)
    result = run_sweep(config(tmp_path, lambdas=(0.5,), epochs=1), model=user_model, data=(train, val))
    (run,) = children(store, result["parent_run_id"])
    assert run.data.params["l2.n"] == "60"  # 3 full batches and one of 12

    with pytest.raises(ValueError, match="cardinality is unknown.*assert_cardinality"):
        prepare_sweep(config(tmp_path), model=user_model, data=(train.filter(lambda x, y: True), val))


def not_a_model():
    return keras.layers.Dense(3)


def broken():
    raise RuntimeError("no weights file")


def assert_no_run(tmp_path, store: str | None = None) -> None:
    """Nothing was created: no store at all, or one without any run."""
    if store is None and not (tmp_path / "mlflow.db").exists():
        return
    client = mlflow.MlflowClient(store or config(tmp_path).tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert not client.search_runs(experiments)


@pytest.mark.parametrize(
    ("model", "data", "layers", "message"),
    [
        (broken, None, "wide", "calling the model function broken raised RuntimeError: no weights file"),
        (not_a_model, None, "wide", "must return a keras.Model. Received: Dense"),
        (user_model, None, "wide,conv", "'wide,conv' matches none of the Dense layers ['wide', 'narrow', 'head']"),
        (user_model, user_data(features=5), "wide", "takes inputs of shape (8,), but the data has 5 features "
                                                    "(allowed: a model whose input shape is (5,))"),
        (user_model, user_data(classes=4), "wide", "outputs shape (3,), but the data has 4 classes "
                                                   "(allowed: a softmax output of 4 units)"),
    ],
    ids=["raises", "not-a-model", "missing-layer", "features", "classes"],
)
def test_a_model_that_does_not_fit_is_refused_before_any_run(tmp_path, model, data, layers, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        run_sweep(config(tmp_path, layers=layers), model=model, data=data or user_data())
    assert_no_run(tmp_path)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "expected module:function (e.g. my_models:build). Received: 'no_colon'"),
        ("no_such_module_here:build", "no module 'no_such_module_here' in the current directory"),
        ("{module}:nope", "has no attribute 'nope' (its functions: ['build'])"),
    ],
    ids=["spec", "module", "attribute"],
)
def test_cli_refuses_a_bad_model_spec(tmp_path, monkeypatch, capsys, spec, message):
    module = f"models_{tmp_path.name}"
    (tmp_path / f"{module}.py").write_text("def build():\n    return None\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--model", spec.format(module=module), "--epochs", "1"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "mlruns").exists()


def test_a_tracking_server_that_is_down_is_refused_at_once(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ValueError, match=f"the MLflow server {uri} does not answer"):
        run_sweep(config(tmp_path, tracking_uri=uri), model=user_model, data=user_data())
    assert time.monotonic() - started < 10
    assert not (tmp_path / "spool").exists()  # no record was even queued


class KillServerAtLastRunEnd(keras.callbacks.Callback):
    """Kills the tracking server when the sweep's last run ends (after its logger delivered)."""

    def __init__(self, server, runs: int):
        super().__init__()
        self.server, self.runs, self.killed_at = server, runs, None

    def on_train_end(self, logs=None):
        self.runs -= 1
        if self.runs == 0:
            self.server.kill()
            self.killed_at = time.monotonic()


@pytest.mark.multiprocess  # starts an mlflow server (or a script): make test-multiprocess
def test_a_server_killed_at_the_end_costs_at_most_max_delay_and_the_parent_is_spooled(tmp_path, store):
    max_delay = 2.0
    with MlflowServer(tmp_path / "server", store=store) as server:
        kill = KillServerAtLastRunEnd(server, runs=len(LAMBDAS))
        result = run_sweep(config(tmp_path, tracking_uri=server.uri, max_delay=max_delay), model=user_model,
                           data=user_data(), callbacks=[kill])
        waited = time.monotonic() - kill.killed_at
    # The parent's end waited at most max_delay; the rest is the summary and the four plots.
    assert waited < max_delay + 4.0, waited
    spooled = [path.read_text().splitlines() for path in (tmp_path / "spool").glob("*.jsonl")]
    assert len(spooled) == 1, spooled  # the parent's outbox; the children's records were all delivered
    header, *ops = map(json.loads, spooled[0])
    assert header["tracking_uri"] == server.uri
    (parent_key,) = [key for key, run_id in header["runs"].items() if run_id == result["parent_run_id"]]
    assert {op["op"] for op in ops if op["key"] == parent_key} == {"log", "artifact", "end"}
    # The plots wait in the spool too, by their path (they stay in results_dir), for `keras-l2 send-pending`.
    assert sorted(op["local_path"] for op in ops if op["op"] == "artifact") == sorted(map(str, result["plots"]))
    assert any(name == "best_lambda" for op in ops for name, *_ in op.get("metrics", ()))
    assert [op["status"] for op in ops if op["op"] == "end"] == ["FINISHED"]


def test_readme_user_model_example_runs(tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "run_sweep" in b]
    assert "epochs=30" in block
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(None)
    sqlite_store(tmp_path / "mlruns", "mlflow.db")  # the embedded store, schema made
    namespace: dict = {}
    exec(compile(block.replace("epochs=30", "epochs=1"), "README.md", "exec"), namespace)  # as written, 1 epoch
    result = namespace["result"]
    assert [r["l2"] for r in result["results"]] == [0.0, 0.1, 1.0]
    assert result["results"][0]["chosen"] == ["features", "mixer"]
    assert len(list((tmp_path / "plots").glob("*.png"))) == 4
