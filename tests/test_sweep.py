"""The lambda sweep: the note's three findings on real data, the CLI's bad input, parallel runs."""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from keras_l2 import search as sweep
from keras_l2.backend import host
from keras_l2.cli import main
from keras_l2.search.report import best_lines
from tests.helpers import reset_keras, user_data

ROOT = Path(__file__).resolve().parent.parent
LAMBDAS = (0.0, 0.03, 0.3, 3.0)
SEEDS = 2


@pytest.fixture(scope="module")
def short_sweep(tmp_path_factory):
    """A short sweep with fixed seeds, run once for the findings below."""
    reset_keras()  # module fixtures run before conftest's per-test reset
    root = tmp_path_factory.mktemp("sweep")
    config = sweep.SweepConfig(
        lambdas=LAMBDAS, epochs=40, learning_rate=3e-3, seeds=SEEDS, tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
        results_dir=str(root / "results"), verbose=0,
    )
    return sweep.run_sweep(config), config, root


def _final(result, l2, key):
    return [r["history"][key][-1] for r in result["results"] if r["l2"] == l2]


def test_regularized_norms_fall_monotonically_with_lambda_and_free_ones_do_not(short_sweep):
    result, _, _ = short_sweep
    by_lambda = result["by_lambda"]
    for layer in ("hidden_1", "hidden_2"):  # regularized
        norms = [by_lambda[l2]["norms"][layer] for l2 in LAMBDAS]
        assert all(a > b for a, b in zip(norms, norms[1:], strict=False)), (layer, norms)
        assert norms[-1] < 0.5 * norms[0]
    # The free output layer does not shrink the same way: far less, if at all.
    hidden = [by_lambda[l2]["norms"]["hidden_2"] for l2 in LAMBDAS]
    out = [by_lambda[l2]["norms"]["out"] for l2 in LAMBDAS]
    assert out[-1] / out[0] > 1.5 * hidden[-1] / hidden[0], (out, hidden)


def test_validation_data_loss_is_u_shaped_in_lambda(short_sweep):
    result, _, _ = short_sweep
    best = result["best"]
    assert 0.0 < best["l2"] < max(LAMBDAS)
    for seed in range(SEEDS):  # by a clear margin, on every seed
        at = {r["l2"]: r["history"]["val_data_loss"][-1] for r in result["results"] if r["seed"] == seed}
        assert at[best["l2"]] < 0.9 * at[0.0], at
        assert at[max(LAMBDAS)] > at[best["l2"]], at


def test_too_large_a_lambda_keeps_training_data_loss_high_at_a_compromise(short_sweep):
    result, _, _ = short_sweep
    big = [r for r in result["results"] if r["l2"] == max(LAMBDAS)]
    free = [r for r in result["results"] if r["l2"] == 0.0]
    for run in big:
        data_loss = run["history"]["data_loss"]
        assert data_loss[-1] > 10 * max(r["history"]["data_loss"][-1] for r in free)
        # Settled: the last ten epochs barely move, with the penalty a large share of the objective.
        # Adam's epoch-to-epoch noise at this lambda is +-15%: compare five-epoch means, not two single epochs.
        recent, earlier = np.mean(data_loss[-5:]), np.mean(data_loss[-14:-9])
        assert abs(recent - earlier) < 0.25 * recent, (earlier, recent)
        assert run["history"]["l2_penalty"][-1] > 0.2 * (data_loss[-1] + run["history"]["l2_penalty"][-1])


def test_mlflow_holds_a_parent_with_one_child_per_run_and_the_plots(short_sweep):
    result, config, root = short_sweep
    client = mlflow.MlflowClient(config.tracking_uri)
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_lambda"] == result["best"]["l2"]
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == len(LAMBDAS) * SEEDS
    assert sorted(float(c.data.params["l2.lambda"]) for c in children) == sorted(LAMBDAS * SEEDS)
    for child in children:
        assert child.info.status == "FINISHED"
        assert {"loss", "data_loss", "l2_penalty", "val_data_loss", "lambda", "weight_norm/hidden_1",
                "weight_norm/out"} <= set(child.data.metrics)
        assert len(client.get_metric_history(child.info.run_id, "val_data_loss")) == config.epochs
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert artifacts == {f"plots/{name}" for name in ("loss_vs_lambda.png", "norm_vs_lambda.png",
                                                       "norm_trajectories.png", "penalty_share.png")}
    for path in result["plots"]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _cli_error(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", *args])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lambdas", "0,abc"], "'abc' is not a number"),
        (["--lambdas", "0,-1"], "-1"),
        (["--lambdas", "0,nan"], "nan"),
        (["--lambdas", ","], "at least one lambda"),
        (["--lambdas", "0.1,0.1"], "repeated"),
        (["--route", "l1"], "unknown route 'l1'"),
        (["--optimizer", "lbfgs"], "unknown optimizer 'lbfgs'"),
        (["--epochs", "0"], "--epochs"),
        (["--threads", "0"], "--threads: must be an integer >= 1. Received: 0"),
        (["--hidden", "a,b"], "--hidden"),
        (["--tracking-uri", "nonsense"], "Unsupported MLflow tracking URI"),
    ],
)
def test_cli_refuses_bad_arguments_before_any_run(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert message in _cli_error(capsys, *args)
    assert not (tmp_path / "mlruns").exists()  # nothing was created


def _npz(path, **overrides):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.normal(size=(20, 4)), "y_train": np.arange(20) % 3,
              "x_val": rng.normal(size=(8, 4)), "y_val": np.arange(8) % 3}
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return str(path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"y_val": None}, "lacks ['y_val']"),
        ({"y_train": np.arange(19) % 3}, "x_train has 20 examples but y_train has 19"),
        ({"x_val": np.ones((8, 5))}, "x_train has 4 features but x_val has 5"),
        ({"x_train": np.full((20, 4), np.nan)}, "NaN"),
        ({"y_train": np.zeros(20, dtype=int)}, "at least 2 are needed"),
        ({"y_train": np.eye(3)[np.arange(20) % 3], "y_val": np.eye(4)[np.arange(8) % 4]}, "3 classes but y_val has 4"),
        ({"y_train": np.full((20, 3), 0.5), "y_val": np.eye(3)[np.arange(8) % 3]}, "not one-hot"),
        ({"y_val": np.eye(3)[np.arange(8) % 3]}, "both be 1-D class ids or both 2-D"),
        ({"x_test": np.ones((5, 4))}, "holds x_test without y_test; a test split needs both"),
        ({"x_test": np.ones((5, 3)), "y_test": np.arange(5) % 3}, "x_train has 4 features but x_test has 3"),
        ({"x_test": np.ones((5, 4)), "y_test": np.arange(4) % 3}, "x_test has 5 examples but y_test has 4"),
        ({"x_test": np.ones((5, 4)), "y_test": np.eye(3)[np.arange(5) % 3]}, "y_val and y_test must both be 1-D"),
    ],
)
def test_cli_refuses_bad_npz(capsys, tmp_path, monkeypatch, overrides, message):
    monkeypatch.chdir(tmp_path)
    assert message in _cli_error(capsys, "--data", _npz(tmp_path / "data.npz", **overrides))
    assert not (tmp_path / "mlruns").exists()


def test_a_test_split_is_read_with_the_same_classes_and_reported_not_chosen_on(tmp_path):
    names = np.array(["cat", "dog", "emu"])
    data = sweep.load_npz(_npz(tmp_path / "data.npz", y_train=names[np.arange(20) % 3], y_val=names[np.arange(8) % 3],
                               x_test=np.ones((6, 4)), y_test=names[[2, 2, 0, 1, 0, 2]]))
    assert data.class_names == ("cat", "dog", "emu")
    assert data.y_test.argmax(axis=1).tolist() == [2, 2, 0, 1, 0, 2] and data.x_test.dtype == np.float32
    assert data.name == "data.npz (train 20, val 8, test 6)"


@pytest.mark.parametrize(("name", "sizes"), [("digits", (200, 798, 799)), ("wine", (60, 59, 59))])
def test_the_bundled_data_sets_split_three_ways_stratified(name, sizes):
    data = sweep.bundled(name)
    assert (len(data.x_train), len(data.x_val), len(data.x_test)) == sizes
    for split in (data.y_train, data.y_val, data.y_test):  # every class in every split
        assert split.sum(axis=0).min() > 0
    if name == "wine":  # standardized on the training split only
        np.testing.assert_allclose(data.x_train.mean(axis=0), 0, atol=1e-5)
        np.testing.assert_allclose(data.x_train.std(axis=0), 1, rtol=1e-4)
        assert abs(data.x_val.mean()) > 1e-3


def test_the_best_lambdas_test_data_loss_is_reported():
    # Computed by hand from the reported per-lambda means: the line names the chosen lambda's test loss.
    summary = {"best": {"l2": 0.1, "val_data_loss": 0.2, "test_data_loss": 0.25}, "verdict": {
        "tied_with_zero": False, "tied_with": [], "edge": None}, "by_lambda": {}}
    assert "Its test data loss: 0.2500 (the test split was not used to choose)." in best_lines(summary, 1)[1]


def test_cli_refuses_a_file_that_is_not_npz(capsys, tmp_path):
    (tmp_path / "bad.npz").write_text("not an archive")
    assert "not a readable .npz" in _cli_error(capsys, "--data", str(tmp_path / "bad.npz"))
    assert "no such file" in _cli_error(capsys, "--data", str(tmp_path / "missing.npz"))


def test_layers_by_name_or_regex():
    model = sweep.build_model(4, 3, (5, 5), seed=0)
    assert [layer.name for layer in sweep.choose_layers(model, "hidden_1,out")] == ["hidden_1", "out"]
    assert [layer.name for layer in sweep.choose_layers(model, "hidden_.*")] == ["hidden_1", "hidden_2"]
    assert len(sweep.choose_layers(model, "")) == 3
    with pytest.raises(ValueError, match="matches none"):
        sweep.choose_layers(model, "conv.*")
    with pytest.raises(ValueError, match="valid regex"):
        sweep.choose_layers(model, "hidden_(")


def _count(store_uri, experiment):
    client = mlflow.MlflowClient(store_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    points = sum(len(client.get_metric_history(r.info.run_id, "val_data_loss")) for r in runs)
    return runs, points


@pytest.mark.multiprocess
def test_two_workers_and_two_concurrent_sweeps_lose_nothing(tmp_path):
    # A brand-new store, opened by two sweeps at once, one of them with two workers (a thread each).
    store = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    common = ["--lambdas", "0,0.1,1", "--epochs", "3", "--hidden", "16,16", "--tracking-uri", store,
              "--experiment", "concurrent", "--quiet"]
    sweeps = [
        subprocess.Popen([sys.executable, str(ROOT / "experiments" / "sweep.py"), *common, "--workers", "2",
                          "--threads", "1", "--results-dir", str(tmp_path / "a")], env=env, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        subprocess.Popen([sys.executable, "-m", "keras_l2.cli", "sweep", *common, "--seeds", "2",
                          "--results-dir", str(tmp_path / "b")], env=env, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
    ]
    for process in sweeps:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
    runs, points = _count(store, "concurrent")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 2 and len(children) == 3 + 3 * 2
    assert all(r.info.status == "FINISHED" for r in runs)
    assert points == len(children) * 3  # every epoch of every child, once


def test_threads_reach_the_backend_when_the_sweep_is_prepared(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(host, "limit_threads", calls.append)
    config = sweep.SweepConfig(lambdas=(0.0,), hidden=(8,), epochs=1, verbose=0, threads=1,
                               tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    sweep.prepare_sweep(config, data=user_data())
    assert calls == [1]
    sweep.prepare_sweep(sweep.SweepConfig(lambdas=(0.0,), hidden=(8,), epochs=1, verbose=0,
                                          tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), data=user_data())
    assert calls == [1]  # no --threads: the backend keeps its own
