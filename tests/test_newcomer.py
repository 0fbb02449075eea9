"""A sweep a newcomer can trust (issue 14): clean refusals, an honest best lambda, defaults that show its effect."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest

from keras_l2 import MlflowL2Logger, l2_math, select_layers
from keras_l2._checks import OPTIMIZERS
from keras_l2.cli import main
from keras_l2.search import SweepConfig, check_config, run_sweep
from keras_l2.search.config import DEFAULT_LEARNING_RATES
from keras_l2.search.report import TIE_TOLERANCE, judge_best, training_notes
from keras_l2.tracking import records, spool
from keras_l2.tracking.store import TrackingStore, resolve_store, ui_hint
from tests.helpers import compile_route, data, mlp, sqlite_store, user_data
from tests.mlflow_server import free_port

ROOT = Path(__file__).resolve().parent.parent


def _entry(l2, val, std=0.0, train=0.1):
    return {"l2": l2, "val_data_loss": val, "val_data_loss_std": std, "data_loss": train}


def _grid(values, stds=None):
    stds = stds or [0.0] * len(values)
    by_lambda = {l2: _entry(l2, v, s) for (l2, v), s in zip(values, stds, strict=True)}
    return by_lambda, min(by_lambda.values(), key=lambda e: e["val_data_loss"])


# ------------------------------------------------------------------ 6. which lambda is best, honestly
def test_a_best_lambda_within_one_percent_of_lambda_0_is_a_tie_with_one_seed():
    # Was: "Best lambda ... 0.01 (2.2964 against 2.2964 at lambda 0)", nothing more.
    by_lambda, best = _grid([(0.0, 2.2964), (0.01, 2.2963), (0.1, 2.40)])
    verdict = judge_best(by_lambda, best, seeds=1)
    assert verdict["tied_with_zero"] and verdict["tied_with"] == [0.0]
    by_lambda, best = _grid([(0.0, 0.50), (0.01, 0.50 * (1 - 2 * TIE_TOLERANCE)), (0.1, 0.60)])
    assert not judge_best(by_lambda, best, seeds=1)["tied_with_zero"]


def test_with_seeds_a_difference_inside_the_seeds_spread_is_a_tie_and_the_grids_edge_is_named():
    # Was: lambda 10 picked on breast-cancer data (0.1111 against 0.1124), inside the seeds' spread, at the edge.
    by_lambda, best = _grid([(0.0, 0.1124), (1.0, 0.1150), (10.0, 0.1111)], stds=[0.004, 0.003, 0.005])
    verdict = judge_best(by_lambda, best, seeds=3)
    assert verdict["tied_with_zero"] and verdict["tied_with"] == [1.0]
    assert verdict["edge"] == "largest" and verdict["suggest"] == [30.0, 100.0]
    # Far apart with a small spread: distinguishable.
    by_lambda, best = _grid([(0.0, 0.50), (0.1, 0.40), (1.0, 0.30), (10.0, 0.45)], stds=[0.01] * 4)
    assert judge_best(by_lambda, best, seeds=3) == {"tied_with_zero": False, "tied_with": [], "edge": None,
                                                    "suggest": []}


def test_a_best_at_the_smallest_nonzero_lambda_suggests_smaller_ones():
    by_lambda, best = _grid([(0.0, 0.60), (0.01, 0.40), (0.1, 0.50)])
    verdict = judge_best(by_lambda, best, seeds=1)
    assert verdict["edge"] == "smallest" and verdict["suggest"] == pytest.approx([0.001, 0.01 / 3])


def test_the_plots_say_what_their_error_bars_are_and_the_penalty_share_explains_itself(tmp_path, monkeypatch):
    # Was: no word on error bars; penalty_share.png jumped to 0.95 at lambda 0.01 with nothing to say why.
    from matplotlib.figure import Figure

    from keras_l2.search import draw_plots, summarize

    texts, save = {}, Figure.savefig

    def recording(fig, path, *args, **kwargs):
        texts[Path(path).name] = [t.get_text() for ax in fig.axes for t in (ax.title, *ax.texts)]
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording)
    results = [{"l2": l2, "seed": seed, "chosen": ["h"], "norms": {"h": 1.0, "out": 1.0},
                "norm_history": {"h": [1.0, 1.0], "out": [1.0, 1.0]},
                "history": {"data_loss": [train], "val_data_loss": [0.3], "val_accuracy": [0.9], "l2_penalty": [pen]}}
               for seed in (0, 1) for l2, train, pen in ((0.0, 0.001, 0.0), (0.01, 0.002, 0.04), (3.0, 0.13, 0.32))]
    config = SweepConfig(lambdas=(0.0, 0.01, 3.0), seeds=2)
    draw_plots(config, results, summarize(config, results), tmp_path)
    assert "error bars: std over 2 seeds" in texts["loss_vs_lambda.png"][0]
    share = " ".join(texts["penalty_share.png"])
    assert "high at small lambda once the data is fitted" in share
    assert "lambda 0.01: data nearly fitted\ntrain data loss 0.002, penalty 95%" in share
    assert "lambda 3: fit held back\ntrain data loss 0.13, penalty 71%" in share
    config = SweepConfig(lambdas=(0.0, 0.01, 3.0))
    draw_plots(config, results[:3], summarize(config, results[:3]), tmp_path)
    assert "one seed: no error bars" in texts["loss_vs_lambda.png"][0]


# ------------------------------------------------------------------ 8, 9. defaults that show lambda's effect
def test_each_optimizer_has_its_own_default_learning_rate_and_an_explicit_one_wins():
    assert check_config(SweepConfig(optimizer="sgd")).learning_rate == 0.1
    assert check_config(SweepConfig(optimizer="adam")).learning_rate == 1e-3
    assert check_config(SweepConfig(optimizer="sgd", learning_rate=0.02)).learning_rate == 0.02
    assert check_config(SweepConfig(optimizer="sgd", learning_rate=1)).learning_rate == 1.0
    assert set(DEFAULT_LEARNING_RATES) == set(OPTIMIZERS)  # a new optimizer needs its default step size


def test_sgd_at_its_default_learning_rate_trains_the_digits_and_one_that_does_not_is_warned_about(tmp_path):
    # Was: --optimizer sgd at 1e-3 reached val acc 0.375 after 60 epochs, and said nothing.
    common = {"lambdas": (0.0,), "optimizer": "sgd", "tracking_uri": sqlite_store(tmp_path),
              "results_dir": str(tmp_path / "plots"), "verbose": 0}
    trained = run_sweep(SweepConfig(**common))
    assert trained["by_lambda"][0.0]["val_accuracy"] > 0.8, trained["by_lambda"][0.0]
    assert not any("barely trained" in note for note in trained["notes"])
    stalled = run_sweep(SweepConfig(**common, learning_rate=1e-3, epochs=5))
    (warning,) = [note for note in stalled["notes"] if "barely trained" in note]
    assert "log(10) = 2.303" in warning and "--learning-rate" in warning


def test_decay_left_is_what_the_decoupled_update_does_step_by_step():
    w = np.ones(1)
    for _ in range(420):
        w = keras.ops.convert_to_numpy(l2_math.decayed(keras.ops.convert_to_tensor(w, "float64"), 3.0, 200, 1e-3))
    assert l2_math.decay_left(3.0, 200, 1e-3, 420) == pytest.approx(float(w[0]), rel=1e-12)


def test_a_decoupled_grid_that_barely_decays_is_said_to_and_a_useful_range_is_named():
    # Was: --route decoupled with the default grid moved hidden_1's norm from 6.56 to 6.37 at lambda 10.
    config = check_config(SweepConfig(route="decoupled"))  # the default grid, Adam at 1e-3, 60 epochs
    summary = {"by_lambda": {0.0: _entry(0.0, 0.3)}}
    steps = 60 * 7  # 200 examples in batches of 32
    notes = training_notes(config, summary, classes=10, n=200, steps=steps)
    assert "over the run's 420 steps it alone would take 1.3% of a weight" in notes[0], notes
    suggested = float(notes[1].split("Lambdas around ")[1].split()[0])
    assert l2_math.decay_left(suggested, 200, config.learning_rate, steps) == pytest.approx(0.5, abs=0.01)
    coupled = check_config(SweepConfig(route="coupled"))
    assert training_notes(coupled, summary, classes=10, n=200, steps=steps) == []


# ------------------------------------------------------------------ 2, 4, 5, 7, 16. the command line
def _npz(path, **overrides):
    arrays = dict(zip(("x_train", "y_train", "x_val", "y_val"), user_data(), strict=True))
    arrays.update(overrides)
    np.savez(path, **arrays)
    return str(path)


def _sweep(*args):
    return main(["sweep", "--lambdas", "0,1", "--epochs", "2", "--batch-size", "16", "--learning-rate", "0.01",
                 "--hidden", "16", "--layers", "hidden_1", *args])


def test_string_labels_are_classes_and_their_mapping_is_logged(tmp_path, monkeypatch, capsys):
    # Was: TypeError: ufunc 'remainder' not supported, from _one_hot.
    monkeypatch.chdir(tmp_path)
    x_train, y_train, x_val, y_val = user_data()
    names = np.array(["cat", "dog", "emu"])
    assert _sweep("--data", _npz(tmp_path / "d.npz", y_train=names[y_train], y_val=names[y_val]), "--json") == 0
    result = json.loads(capsys.readouterr().out)
    parent = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}").get_run(result["parent_run_id"])
    assert parent.data.params["sweep.classes"] == "0=cat,1=dog,2=emu"


def _refused(capsys, tmp_path, *args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        _sweep(*args)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keras-l2 sweep: error: "), captured.err
    assert "Traceback" not in captured.out + captured.err
    assert not (tmp_path / "mlruns").exists()  # no run, no spool, no plots folder
    return lines[0]


def test_validation_classes_missing_from_training_are_refused_unless_allowed(tmp_path, monkeypatch, capsys):
    # Was: accepted silently (val acc 0.34, val loss 4.36).
    monkeypatch.chdir(tmp_path)
    x_train, y_train, x_val, y_val = user_data()
    keep = y_train != 2
    path = _npz(tmp_path / "d.npz", x_train=x_train[keep], y_train=y_train[keep])
    message = _refused(capsys, tmp_path, "--data", path)
    assert f"class(es) [2] that y_train lacks ({int(np.sum(y_val == 2))} validation examples)" in message
    assert "--allow-unseen-classes" in message
    names = np.array(["cat", "dog", "emu"])
    path = _npz(tmp_path / "s.npz", x_train=x_train[keep], y_train=names[y_train[keep]], y_val=names[y_val])
    assert "['emu'] that y_train lacks" in _refused(capsys, tmp_path, "--data", path)
    assert _sweep("--data", path, "--allow-unseen-classes", "--quiet") == 0


@pytest.mark.parametrize(("overrides", "fragment"), [
    ({"y_train": np.array(["a", "b"] * 30)}, "both hold class labels of one kind"),
    ({"y_train": np.array([True, False] * 30), "y_val": np.array([True, False] * 15)}, "got dtype bool"),
])
def test_labels_of_mixed_kinds_are_refused_in_one_line(tmp_path, monkeypatch, capsys, overrides, fragment):
    monkeypatch.chdir(tmp_path)
    assert fragment in _refused(capsys, tmp_path, "--data", _npz(tmp_path / "d.npz", **overrides))


def test_quiet_still_prints_the_results_and_json_prints_only_them(tmp_path, monkeypatch, capsys):
    # Was: --quiet hid the final table and the best lambda too; there was no output for scripts.
    monkeypatch.chdir(tmp_path)
    path = _npz(tmp_path / "d.npz")
    assert _sweep("--data", path, "--quiet") == 0
    out = capsys.readouterr().out
    assert "   lambda" in out and "Best lambda on validation data loss" in out
    assert "runs done" not in out and "Epoch" not in out  # no progress
    assert _sweep("--data", path, "--json") == 0
    result = json.loads(capsys.readouterr().out)  # the whole of stdout is one JSON object
    assert [e["l2"] for e in result["by_lambda"]] == [0.0, 1.0]
    assert result["best_lambda"] in (0.0, 1.0) and set(result["verdict"]) >= {"tied_with_zero", "edge"}
    # 16: the plots go beside the store, one folder per sweep, not into experiments/results under any cwd.
    folder = Path("mlruns") / "plots" / result["parent_run_id"]
    assert [Path(p).parent for p in result["plots"]] == [folder] * 4 and (tmp_path / folder).is_dir()
    assert not (tmp_path / "experiments").exists()


def test_every_sweep_option_says_what_it_does_and_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--epochs", "--learning-rate", "--seeds", "--workers", "--experiment", "--batch-size"):
        described = text.split(option)[-1].split(" --")[0]
        assert "default" in described, (option, described)


@pytest.mark.parametrize(("argv", "code", "stream", "text"), [
    (["--help"], 0, "out", "usage: keras-l2"),
    (["sweep", "--help"], 0, "out", "--learning-rate"),
    (["sweep", "--lambdas", "0,abc"], 2, "err", "keras-l2 sweep: error: --lambdas: 'abc' is not a number"),
    (["sweep", "--optimizer", "lbfgs"], 2, "err", "keras-l2 sweep: error: --optimizer: unknown optimizer 'lbfgs'"),
    (["sweep", "--epochs", "x"], 2, "err", "argument --epochs: invalid int value: 'x'"),
    (["tune", "--help"], 0, "out", "--range"),
    (["tune", "--range", "10,1"], 2, "err", "keras-l2 tune: error: --range: 10,1 is not a range to search (it is "
     "empty"),
    (["tune", "--range=-1,1"], 2, "err", "keras-l2 tune: error: --range: -1,1 is not a range to search"),
    (["tune", "--range", "1e-3"], 2, "err", "keras-l2 tune: error: --range: two numbers low,high"),
    (["tune", "--dataset", "iris"], 2, "err", "keras-l2 tune: error: --dataset: unknown data set 'iris'; choose one "
     "of digits, wine"),
])
def test_help_and_bad_options_answer_without_importing_keras(argv, code, stream, text):
    # Was: `keras-l2 --help` took about 4 s (8.5 s on this machine) and printed TensorFlow's log lines.
    heavy = ("keras", "tensorflow", "jax", "torch")
    script = (f"import sys, keras_l2_cli\ntry:\n    keras_l2_cli.main({argv!r})\nexcept SystemExit as e:\n"
              f"    print('exit', e.code, sorted(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.stderr.strip().splitlines()[-1] == f"exit {code} []", done.stderr
    assert text in (done.stdout if stream == "out" else done.stderr)
    assert "Traceback" not in done.stderr


def test_the_command_runs_the_library_after_its_check(tmp_path):
    # The same entry point, with options that pass the check, imports keras_l2 for real and sweeps.
    script = ("import keras_l2_cli, sys\nsys.exit(keras_l2_cli.main(['send-pending', '--spool-dir', "
              f"{str(tmp_path)!r}]))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0 and done.stdout == "No records are pending.\n", done.stderr


def test_make_sweep_rewrites_no_tracked_file():
    # Was: `make sweep` rewrote the committed experiments/results/norm_trajectories.png.
    tracked = subprocess.run(["git", "ls-files", "experiments/results"], cwd=ROOT, capture_output=True, text=True)
    assert tracked.returncode == 0 and tracked.stdout == ""
    readme = (ROOT / "README.md").read_text()
    for image in ("loss_vs_lambda.png", "norm_vs_lambda.png", "norm_trajectories.png", "penalty_share.png"):
        assert f"docs/images/{image}" in readme and (ROOT / "docs" / "images" / image).is_file()


# ------------------------------------------------------------------ 14. the UI opens in the right view
def test_experiments_keras_l2_creates_open_in_mlflows_model_training_view(tmp_path):
    # Was: MLflow 3.17's UI opened them in its GenAI view, where a sweep's children are hard to find.
    model = mlp()
    compile_route(model, "regularizer", "sgd", 0.1, 24, select_layers(model))
    store = sqlite_store(tmp_path)
    logger = MlflowL2Logger(tracking_uri=store, experiment_name="fresh", verbose=0, spool_dir=tmp_path)
    model.fit(*data(24), epochs=1, verbose=0, callbacks=[logger])
    client = mlflow.MlflowClient(store)
    assert client.get_experiment_by_name("fresh").tags["mlflow.experimentKind"] == "custom_model_development"
    client.create_experiment("theirs")  # an experiment the user made is left as it is
    logger = MlflowL2Logger(tracking_uri=store, experiment_name="theirs", verbose=0, spool_dir=tmp_path)
    model.fit(*data(24), epochs=1, verbose=0, callbacks=[logger])
    assert "mlflow.experimentKind" not in client.get_experiment_by_name("theirs").tags


# ------------------------------------------------------------------ 10. resumed training
def test_a_resumed_fit_logs_its_starting_norms_at_initial_epoch(tmp_path):
    # Was: after fit(initial_epoch=2), weight_norm/<layer> at steps [0, 3, 4].
    model = mlp()
    compile_route(model, "regularizer", "sgd", 0.1, 24, select_layers(model))
    logger = MlflowL2Logger(tracking_uri=sqlite_store(tmp_path), verbose=0, spool_dir=tmp_path)
    model.fit(*data(24), initial_epoch=2, epochs=4, verbose=0, callbacks=[logger])
    client = mlflow.MlflowClient(logger.store.tracking_uri)
    keys = [k for k in client.get_run(logger.run_id).data.metrics if k.startswith("weight_norm/")]
    for key in keys + ["lambda"]:
        assert sorted(m.step for m in client.get_metric_history(logger.run_id, key)) == [2, 3, 4], key


# ------------------------------------------------------------------ 12. send-pending, per store
def test_send_pending_sends_every_stores_records_and_says_per_store_what_is_left(tmp_path, capsys, caplog):
    # Was: "0 record(s) still pending" without --tracking-uri while the spool held another store's records,
    # and "Training goes on..." with it.
    folder = tmp_path / "spool"
    local, dead = sqlite_store(tmp_path), f"http://127.0.0.1:{free_port()}"
    for uri in (local, dead):
        run = records.new_run("pending", "left behind", None, None)
        spool.write(folder / f"{abs(hash(uri))}{spool.SUFFIX}", spool.header(uri, None, {}),
                    [run, records.EndRun(run.key, "FINISHED", records.now_ms())])
    caplog.set_level(logging.WARNING, "keras_l2")
    assert main(["send-pending", "--spool-dir", str(folder), "--timeout", "5"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert sorted(out) == sorted([f"{local}: 2 record(s) sent, 0 still pending.",
                                  f"{dead}: 0 record(s) sent, 2 still pending."])
    assert "Training goes on" not in caplog.text and f"cannot reach the MLflow store {dead}" in caplog.text
    runs = mlflow.MlflowClient(local).search_runs([mlflow.MlflowClient(local).get_experiment_by_name("pending")
                                                   .experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert main(["send-pending", "--spool-dir", str(tmp_path / "empty")]) == 0
    assert capsys.readouterr().out == "No records are pending.\n"


# ------------------------------------------------------------------ 13. hints that fit where the user is
def test_the_ui_hint_fits_the_store_and_the_working_directory(tmp_path, monkeypatch):
    # Was: `make ui` outside the repository, and `mlflow ui --backend-store-uri http://...` for a server.
    assert ui_hint(TrackingStore("http://10.0.0.5:5000/"), "abc") == "Open http://10.0.0.5:5000/#/runs/abc"
    # A sweep links its experiment's runs in the model-training view (tests/test_ui.py opens it in Chromium).
    assert ui_hint(TrackingStore("http://10.0.0.5:5000"), "abc", "7") == \
        "Open http://10.0.0.5:5000/#/experiments/7/runs?workflowType=machine_learning"
    monkeypatch.chdir(tmp_path)
    embedded = resolve_store(root=tmp_path, honour_user_uri=False)
    hint = ui_hint(embedded, "abc")
    assert "make ui" not in hint and f"mlflow ui --backend-store-uri {embedded.tracking_uri}" in hint
    assert hint.endswith("http://127.0.0.1:5000/#/runs/abc")
    monkeypatch.chdir(ROOT)  # the repository, whose Makefile has `ui`, over its own mlruns/
    assert ui_hint(resolve_store(root=ROOT, honour_user_uri=False), "abc").startswith("Open the MLflow UI: make ui")
    assert "make ui" not in ui_hint(embedded, "abc")  # another directory's store
