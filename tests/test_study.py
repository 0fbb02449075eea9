"""A sweep shared through an Optuna study (`--study`, `--storage`): its checks, its runs, workers that die, and the
team server (PostgreSQL and an MLflow server with basic auth) that the multiprocess tests start themselves."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import keras
import mlflow
import numpy as np
import optuna
import pytest

from keras_l2.cli import main
from keras_l2.search import SweepConfig, prepare_sweep, run_sweep
from keras_l2.search.config import TuneConfig, check_tune_config, mask_url
from keras_l2.search.postgres import find_programs
from keras_l2.search.study_plan import (
    PRUNED_TAG,
    RESULT_ATTR,
    STUDY_TAG,
    SWEEP_ATTR,
    TRIAL_TAG,
    WORKER_ATTR,
    sampling,
    startup_lambdas,
)
from tests.helpers import user_data
from tests.mlflow_server import free_port

REPO = Path(__file__).resolve().parents[1]


def config(tmp_path, **overrides) -> SweepConfig:
    values = {"lambdas": (0.0, 1.0), "layers": "hidden_.*", "hidden": (16,), "epochs": 2, "batch_size": 16,
              "learning_rate": 1e-2, "stacked": False, "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
              "results_dir": str(tmp_path / "results"), "spool_dir": str(tmp_path / "spool"), "verbose": 0,
              "study": "s", "storage": f"sqlite:///{tmp_path / 'optuna.db'}", "heartbeat": 2.0}
    return SweepConfig(**{**values, **overrides})


# --- checks, before anything is created ---------------------------------------------------------------------

@pytest.mark.parametrize("url, shown", [
    ("postgresql+psycopg://user:s3cret@db:5432/optuna", "postgresql+psycopg://user:***@db:5432/optuna"),
    ("postgresql://user:p@ss@db/optuna", "postgresql://user:***@db/optuna"),  # an @ the user did not escape
    ("postgresql://user@db/optuna", "postgresql://user@db/optuna"),
    ("sqlite:///tmp/optuna.db", "sqlite:///tmp/optuna.db"),
])
def test_a_storage_url_is_shown_without_its_password(url, shown):
    assert mask_url(url) == shown


@pytest.mark.parametrize("argv, message", [
    (["--study", "s"], "--study needs --storage"),
    (["--storage", "sqlite:///x.db"], "--storage needs --study"),
    (["--study", "s", "--storage", "mysql://u:hunter2@db/x"], "--storage: 'mysql://u:***@db/x' is not a database"),
    (["--study", "s", "--storage", "sqlite:///x.db", "--heartbeat", "0.5"], "--heartbeat: seconds >= 1"),
    (["--study", "s", "--storage", "sqlite:///x.db", "--workers", "2"], "--workers: with --study, run the same"),
    (["--study", "it's", "--storage", "sqlite:///x.db"], "--study: a name of 1 to 200 letters, digits"),
    (["--sampler", "tpe", "--trials", "4"], "--sampler tpe: proposals are shared through a study"),
    (["--study", "s", "--storage", "sqlite:///x.db", "--sampler", "random"], "--sampler: 'random' is not one of"),
    (["--study", "s", "--storage", "sqlite:///x.db", "--sampler", "tpe"], "--trials: TPE needs the number of lambdas"),
    (["--study", "s", "--storage", "sqlite:///x.db", "--trials", "3"], "--trials: a grid trains every"),
    (["--study", "s", "--storage", "sqlite:///x.db", "--sampler", "tpe", "--trials", "3", "--seeds", "2"],
     "--seeds: --sampler tpe proposes one lambda per trial"),
    (["--study", "s", "--storage", "sqlite:///x.db", "--sampler", "tpe", "--trials", "3", "--range", "1,0.1"],
     "--range: 1,0.1 is not a range to search"),
])
def test_bad_study_options_exit_with_one_line_and_create_nothing(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KERAS_L2_STORAGE", raising=False)  # --storage's default
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and message in err, err
    assert "hunter2" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["--trials", "5"], "--trials: counts the lambdas a shared tune (--study NAME --storage URL) tries"),
    (["--study", "t"], "--study needs --storage"),
    (["--study", "t", "--storage", "sqlite:///x.db", "--seed", "1"], "--seed: a shared tune (--study) trains"),
    (["--study", "t", "--storage", "sqlite:///x.db", "--threads", "0"],
     "--threads: must be an integer >= 1. Received: 0"),
    (["--study", "t", "--storage", "sqlite:///x.db", "--log-every-n-steps", "2"],
     "--log-every-n-steps: logs the one-machine tune's first stage"),
    (["--study", "t", "--storage", "sqlite:///x.db", "--trials", "0"], "--trials: TPE needs the number of lambdas"),
    (["--study", "t", "--storage", "sqlite:///x.db", "--range", "0,1"], "--range: 0,1 is not a range to search"),
])
def test_bad_shared_tune_options_exit_with_one_line_and_create_nothing(argv, message, tmp_path, monkeypatch,
                                                                         capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KERAS_L2_STORAGE", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_database_that_does_not_answer_is_refused_before_anything(tmp_path):
    port = free_port()  # nothing listens there
    started = time.monotonic()
    with pytest.raises(ValueError, match=rf"--storage: cannot open postgresql://me:\*\*\*@127.0.0.1:{port}/optuna "
                                         r"\(.*\)\. No run or trial was created") as error:
        prepare_sweep(config(tmp_path, storage=f"postgresql://me:hunter2@127.0.0.1:{port}/optuna"),
                      model=None, data=user_data(classes=3, features=8))
    assert "hunter2" not in str(error.value)
    assert time.monotonic() - started < 30
    assert not (tmp_path / "mlflow.db").exists() or not mlflow.MlflowClient(
        f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(["0"])


def test_a_study_of_another_sweep_is_refused_before_training(tmp_path):
    data = user_data(classes=3, features=8)
    run_sweep(config(tmp_path, lambdas=(0.0,)), data=data)
    with pytest.raises(ValueError, match=r"study 's' in sqlite:///.* was created for another sweep "
                                         r"\(sweep.epochs: '2' there, '3' here.*\)"):
        prepare_sweep(config(tmp_path, lambdas=(0.0,), epochs=3), data=data)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.trials) == 1  # nothing was added


# --- one worker, on SQLite ------------------------------------------------------------------------------------

def test_a_study_trains_every_point_once_exactly_as_the_plain_sweep(tmp_path, capsys):
    """Each (lambda, seed) is a COMPLETE trial whose run equals the same run of a sweep without a study."""
    data = user_data(classes=3, features=8)
    lambdas = (0.0, 1.0)
    result = run_sweep(config(tmp_path, lambdas=lambdas, seeds=2), data=data)
    plain = run_sweep(config(tmp_path / "plain", lambdas=lambdas, seeds=2, study=None, storage=None), data=data)

    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted((t.params["lambda"], t.params["seed"]) for t in complete) == sorted(
        (l2, seed) for l2 in lambdas for seed in range(2))
    assert len(study.trials) == 4
    assert study.user_attrs["keras_l2.parent_run_id"] == result["parent_run_id"]
    assert json.loads(json.dumps(study.user_attrs[SWEEP_ATTR]))["sweep.epochs"] == "2"
    for trial in complete:
        (twin,) = [r for r in plain["results"] if (r["l2"], r["seed"]) == (trial.params["lambda"],
                                                                          trial.params["seed"])]
        mine = trial.user_attrs[RESULT_ATTR]
        for key in ("data_loss", "val_data_loss", "l2_penalty"):
            np.testing.assert_allclose(mine["history"][key], twin["history"][key], rtol=1e-6)
        assert trial.value == mine["history"]["val_data_loss"][-1]
        assert trial.user_attrs[WORKER_ATTR].endswith(f":{os.getpid()}")
    assert result["best"]["l2"] == plain["best"]["l2"]
    assert len(result["plots"]) == 4 and all(Path(p).exists() for p in result["plots"])

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["sweep.study"] == "s"
    assert parent.data.metrics["best_lambda"] == result["best"]["l2"]
    runs = client.search_runs([parent.info.experiment_id],
                              f"tags.mlflow.parentRunId = '{result['parent_run_id']}'")
    assert sorted(int(r.data.tags[TRIAL_TAG]) for r in runs) == list(range(4))
    assert {r.data.tags[STUDY_TAG] for r in runs} == {"s"} and {r.info.status for r in runs} == {"FINISHED"}

    capsys.readouterr()
    assert main(["report", "--study", "s", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}",
                 "--results-dir", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr().out
    assert result["table"] in printed and f"4 of 4 runs finished; parent run {result['parent_run_id']}" in printed
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(Path(p).name for p in result["plots"])
    with pytest.raises(SystemExit) as missing:
        main(["report", "--study", "nope", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}"])
    assert missing.value.code == 2 and "there is no study 'nope'" in capsys.readouterr().err

    again = run_sweep(config(tmp_path, lambdas=lambdas, seeds=2), data=data)  # a late worker: nothing is left
    assert again["results"] == [] and again["best"]["l2"] == result["best"]["l2"]
    assert len(optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials) == 4


def test_a_shared_tune_spreads_its_first_lambdas_over_the_range_then_tpe_proposes(tmp_path, monkeypatch, capsys):
    """`keras-l2 tune --study`: TPE over --range; its first lambdas are the centres of equal thirds of the range
    (in log scale), not random draws; the answer is the best finished trial's lambda."""
    monkeypatch.chdir(tmp_path)
    x, y, x_val, y_val = user_data(classes=3, features=8)
    np.savez(tmp_path / "data.npz", x_train=x, y_train=y, x_val=x_val, y_val=y_val)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert main(["tune", "--study", "t", "--storage", storage, "--trials", "4", "--range", "1e-3,10",
                 "--data", str(tmp_path / "data.npz"), "--hidden", "16", "--epochs", "3", "--batch-size", "16",
                 "--learning-rate", "0.01", "--heartbeat", "2", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)

    study = optuna.load_study(study_name="t", storage=storage)
    lambdas = [t.params["lambda"] for t in study.trials]
    assert len(lambdas) == 4
    np.testing.assert_allclose(lambdas[:3], [10 ** (-3 + 4 * (i + 0.5) / 3) for i in range(3)], rtol=1e-12)
    assert 1e-3 <= lambdas[3] <= 10 and lambdas[3] not in lambdas[:3]
    # ... and TPE's own, not a random draw: its random start is the spread
    tpe = TuneConfig(study="t", storage=storage, trials=4, lambda_range=(1e-3, 10))
    assert sampling(check_tune_config(tpe))["sampler"]._n_startup_trials == 3
    assert (tpe.sampler, tpe.trials) == ("grid", 4)  # the caller's config is left as it was
    assert startup_lambdas(tpe) == pytest.approx(lambdas[:3], rel=1e-12)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert result["best_lambda"] == min(complete, key=lambda t: t.value).params["lambda"]
    assert result["best_val_data_loss"] == min(t.value for t in complete)

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    parent = client.get_run(result["parent_run_id"])
    assert client.get_experiment(parent.info.experiment_id).name == "keras_l2-tune"
    assert parent.data.tags["tune"] == "true" and parent.info.run_name == "tune regularizer t"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4  # in the tune's experiment, with their parent
    assert (parent.data.params["sweep.sampler"], parent.data.params["sweep.trials"],
            parent.data.params["sweep.range"]) == ("tpe", "4", "0.001,10")
    assert parent.data.metrics["best_lambda"] == result["best_lambda"]
    assert result["plots"] and all(Path(p).resolve().parent == tmp_path / "mlruns" / "plots" / result["parent_run_id"]
                                   and Path(p).exists() for p in result["plots"])


class FailOnce(keras.callbacks.Callback):
    """Raises in the first `fit` it sees: a worker whose training crashes."""

    failed = False

    def on_train_begin(self, logs=None):
        if not FailOnce.failed:
            FailOnce.failed = True
            raise RuntimeError("the worker crashed")


def test_a_crashed_trial_fails_and_the_next_worker_trains_its_point_again(tmp_path):
    data = user_data(classes=3, features=8)
    with pytest.raises(RuntimeError, match="the worker crashed"):
        run_sweep(config(tmp_path), data=data, callbacks=[FailOnce()])
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["FAIL", "WAITING"]  # not left RUNNING

    result = run_sweep(config(tmp_path), data=data)  # a worker started again
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "COMPLETE", "FAIL"]
    assert sorted(t.params["lambda"] for t in study.trials if t.state.name == "COMPLETE") == [0.0, 1.0]
    parent = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and len(result["results"]) == 2


# --- several workers, PostgreSQL and an MLflow server with basic auth -----------------------------------------

needs_postgres = pytest.mark.skipif(find_programs() is None, reason="PostgreSQL is not installed "
                                    "(make test-multiprocess installs Debian's package)")


@pytest.fixture(scope="module")
def team():
    from keras_l2.search.team_server import start_team_server

    # Not under pytest's folders (mode 700): as root, PostgreSQL runs as its own user, who must enter this one.
    root = Path(tempfile.mkdtemp(prefix="keras_l2_team_"))
    os.chmod(root, 0o755)
    server = start_team_server(root, port=0)
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


def worker_env(team, password=None) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": team.password if password is None else password,
            "KERAS_L2_STORAGE": team.storage,
            "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}


GRID = ("--lambdas", "0,0.01,0.03,0.1,0.3,1", "--seeds", "2", "--epochs", "6", "--hidden", "32", "--heartbeat", "2",
        "--no-stacked")


# TensorFlow 2.21 logs through absl, which ignores TF_CPP_MIN_LOG_LEVEL until absl::InitializeLog() runs, so on a
# CPU with oneDNN its import writes a banner to stderr that no setting short of TF_ENABLE_ONEDNN_OPTS=0 (which changes
# numerics) silences (abseil/abseil-cpp#1957). Those lines are TensorFlow's; what keras-l2 writes is the rest.
NATIVE_LOG_LINE = re.compile(r"WARNING: All log messages before absl::InitializeLog\(\)"
                             r"|[IWE]\d{4} [\d:.]+ +\d+ \S+:\d+\] "
                             r"|To enable the following instructions: .* rebuild TensorFlow")  # cpu_feature_guard's 2nd


def own_lines(stderr: str) -> list:
    """The lines of `stderr` that keras-l2 wrote, without TensorFlow's native import banner."""
    return [line for line in stderr.splitlines() if not NATIVE_LOG_LINE.match(line)]


def worker_command(team, study: str, *options) -> list:
    return [sys.executable, "-m", "keras_l2.cli", "sweep", "--study", study,  # --storage: KERAS_L2_STORAGE
            "--tracking-uri", team.tracking_uri, "--experiment", study, *options]


def kill_while_training(victim, study_name: str, storage, client, timeout: float = 300) -> bool:
    """SIGKILLs `victim` once the MLflow run of a trial it took is RUNNING; whether it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and victim.poll() is None:
        try:
            trials = optuna.load_study(study_name=study_name, storage=storage).trials
        except KeyError:
            trials = []
        taken = [t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING
                 and t.user_attrs.get(WORKER_ATTR, "").endswith(f":{victim.pid}")]
        experiment = client.get_experiment_by_name(study_name) if taken else None
        if experiment is not None and client.search_runs(
                [experiment.experiment_id], f"tags.`{TRIAL_TAG}` = '{taken[0]}' and attributes.status = 'RUNNING'"):
            victim.send_signal(signal.SIGKILL)
            return True
        time.sleep(0.3)
    return False


@pytest.mark.multiprocess
@needs_postgres
def test_three_workers_one_killed_train_every_point_exactly_once(team, tmp_path, monkeypatch):
    study_name = "killed-worker"
    logs = [open(tmp_path / f"worker{i}.log", "w") for i in range(3)]  # noqa: SIM115 - closed below
    workers = [subprocess.Popen(worker_command(team, study_name, *GRID), cwd=tmp_path, env=worker_env(team),
                                stdout=log, stderr=subprocess.STDOUT) for log in logs]
    storage = optuna.storages.RDBStorage(team.storage)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", team.password)
    client = mlflow.MlflowClient(team.tracking_uri)
    victim = workers[0]
    assert kill_while_training(victim, study_name, storage, client), "worker 0 never trained a trial"
    codes = [w.wait(timeout=600) for w in workers[1:]]
    victim.wait()
    for log in logs:
        log.close()
    output = "\n".join((tmp_path / f"worker{i}.log").read_text() for i in range(3))
    assert codes == [0, 0], output
    assert "ends KILLED" in output, output

    study = optuna.load_study(study_name=study_name, storage=storage)
    states = [t.state for t in study.trials]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 12, states
    assert sorted((t.params["lambda"], t.params["seed"]) for t in complete) == sorted(
        (l2, s) for l2 in (0, 0.01, 0.03, 0.1, 0.3, 1) for s in range(2))
    assert states.count(optuna.trial.TrialState.FAIL) >= 1 and len(study.trials) == 12 + states.count(
        optuna.trial.TrialState.FAIL), states

    experiment = client.get_experiment_by_name(study_name).experiment_id
    runs = client.search_runs([experiment], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", [r.info for r in parents]
    assert parents[0].info.run_id == study.user_attrs["keras_l2.parent_run_id"]
    assert "best_lambda" in parents[0].data.metrics
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert len(finished) == 12, [(r.data.tags.get(TRIAL_TAG), r.info.status) for r in children]
    assert sorted((float(r.data.params["l2.lambda"]), int(r.data.tags["sweep.seed"])) for r in finished) == sorted(
        (l2, s) for l2 in (0, 0.01, 0.03, 0.1, 0.3, 1) for s in range(2))
    killed = [r for r in children if r.info.status != "FINISHED"]
    assert killed and {r.info.status for r in killed} == {"KILLED"}, [r.info.status for r in killed]
    for run in finished:
        history = client.get_metric_history(run.info.run_id, "val_data_loss")
        assert [m.step for m in history] == list(range(1, 7)), (run.info.run_id, history)
    assert team.password not in output and team.storage not in output


@pytest.mark.multiprocess
@needs_postgres
def test_two_workers_share_tpe_proposals_and_pruned_runs_are_marked_in_both(team, tmp_path, monkeypatch):
    study_name = "tpe-pruned"
    command = worker_command(team, study_name, "--sampler", "tpe", "--trials", "8", "--range", "1e-2,1e4",
                             "--epochs", "4", "--hidden", "32", "--learning-rate", "0.01", "--heartbeat", "2")
    # The user's own guesses go first (Optuna's enqueue_trial): five that train, then two that wreck the model,
    # taken after at least three have finished, so the median pruner has something to stop; TPE proposes the 8th.
    guesses = (0.01, 0.02, 0.03, 0.05, 0.1, 1e4, 3e3)
    ahead = optuna.create_study(study_name=study_name, storage=team.storage, direction="minimize")
    for l2 in guesses:
        ahead.enqueue_trial({"lambda": l2})
    workers = [subprocess.Popen(command, cwd=tmp_path, env=worker_env(team), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs

    study = optuna.load_study(study_name=study_name, storage=team.storage)
    states = [t.state for t in study.trials]
    pruned = {t.number for t in study.trials if t.state == optuna.trial.TrialState.PRUNED}
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(study.trials) == 8 and len(complete) + len(pruned) == 8, states
    assert pruned & {5, 6}, (states, [t.intermediate_values for t in study.trials])
    assert [t.params["lambda"] for t in study.trials[:7]] == list(guesses)
    assert 1e-2 <= study.trials[7].params["lambda"] <= 1e4  # TPE's own proposal
    assert {t.user_attrs[WORKER_ATTR].rsplit(":", 1)[1] for t in study.trials} <= {str(w.pid) for w in workers}

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", team.password)
    client = mlflow.MlflowClient(team.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(study_name).experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {int(r.data.tags[TRIAL_TAG]): r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert sorted(children) == list(range(8))
    assert {n for n, r in children.items() if PRUNED_TAG in r.data.tags} == pruned
    assert {r.data.tags["sweep.seed"] for r in children.values()} == {"0"}
    assert all(children[n].info.status == ("KILLED" if n in pruned else "FINISHED") for n in children)
    assert parent.info.status == "FINISHED" and parent.data.params["sweep.sampler"] == "tpe"
    assert parent.data.metrics["best_lambda"] == pytest.approx(study.best_trial.params["lambda"], rel=1e-12)
    assert team.password not in "".join(outputs)


@pytest.mark.multiprocess
@needs_postgres
def test_a_worker_with_wrong_credentials_is_refused_and_creates_nothing(team, tmp_path):
    started = time.monotonic()
    done = subprocess.run(worker_command(team, "refused", *GRID), cwd=tmp_path,
                          env=worker_env(team, "not-the-password"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "refused the credentials (HTTP 401)" in done.stderr and "No run was created" in done.stderr
    assert len(own_lines(done.stderr)) == 1, done.stderr
    assert time.monotonic() - started < 60
    assert "refused" not in optuna.get_all_study_names(team.storage)

    wrong = team.storage.replace(team.postgres.password, "not-the-password")
    done = subprocess.run(worker_command(team, "refused", *GRID), cwd=tmp_path, capture_output=True, text=True,
                          env={**worker_env(team), "KERAS_L2_STORAGE": wrong}, timeout=300)
    assert done.returncode == 2 and len(own_lines(done.stderr)) == 1, done.stderr
    assert "--storage: cannot open postgresql+psycopg://keras_l2:***@" in done.stderr, done.stderr
    assert "password authentication failed" in done.stderr and "not-the-password" not in done.stderr
    assert "refused" not in optuna.get_all_study_names(team.storage)


@pytest.mark.multiprocess
@needs_postgres
def test_the_team_server_command_needs_credentials_prints_no_secret_and_stops_on_sigterm():
    import base64
    import socket
    import stat
    import urllib.error
    import urllib.request

    root = Path(tempfile.mkdtemp(prefix="keras_l2_team_cli_"))
    os.chmod(root, 0o755)
    port, database_port = free_port(), free_port()
    process = subprocess.Popen([sys.executable, "-m", "keras_l2.cli", "team-server", "--dir", str(root / "team"),
                                "--port", str(port), "--database-port", str(database_port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"})
    try:
        printed = ""
        while "Running; Ctrl-C stops" not in printed:
            line = process.stdout.readline()
            assert line, printed  # the command exited early
            printed += line
        credentials = root / "team" / "credentials.env"
        for secret in ("credentials.env", "server-secrets.env", "basic_auth.ini", "postgres/password"):
            assert stat.S_IMODE((root / "team" / secret).stat().st_mode) == 0o600, secret
        assert "auth_cache_ttl_seconds = 60" in (root / "team" / "basic_auth.ini").read_text()
        values = dict(line.split("=", 1) for line in credentials.read_text().split())
        assert f"keras-l2 sweep --study my-sweep --tracking-uri http://127.0.0.1:{port}" in printed, printed
        assert values["MLFLOW_TRACKING_PASSWORD"] not in printed and values["KERAS_L2_STORAGE"] not in printed
        assert f":{database_port}/optuna" in values["KERAS_L2_STORAGE"]
        listed = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert values["KERAS_L2_STORAGE"].split("@")[0] not in listed  # no database password in the process list
        search = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(search, timeout=10)
        assert refused.value.code == 401
        token = base64.b64encode(f"admin:{values['MLFLOW_TRACKING_PASSWORD']}".encode()).decode()
        with urllib.request.urlopen(urllib.request.Request(search, headers={"Authorization": f"Basic {token}"}),
                                    timeout=10) as answer:
            assert answer.status == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        for closed in (port, database_port):  # both servers are gone
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", closed), timeout=2).close()
    finally:
        if process.poll() is None:
            process.kill()
        shutil.rmtree(root, ignore_errors=True)
