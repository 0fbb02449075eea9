"""The experiment scripts run end to end (tiny sizes: this checks they work, not speed)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.multiprocess  # starts an mlflow server (or a script): make test-multiprocess
def test_benchmark_prints_a_ratio_for_every_variant():
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "benchmark.py"), "--models", "digits", "--steps", "2",
         "--rounds", "1", "--epochs", "2", "--jit", "off"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("  ") for line in done.stdout.splitlines() if line.startswith("digits   off")]
    rows = [[cell.strip() for cell in row if cell.strip()] for row in rows]
    variants = [row[2] for row in rows]
    routes = ["regularizer", "loss", "coupled", "decoupled"]
    assert variants == ["none", "none (A/A)", "keras_L2", "keras_weight_decay", *routes,
                        *(f"{route}+logger" for route in routes)]
    assert float(rows[0][4]) == 1.0  # the baseline's ratio to itself
    assert all(float(row[3]) > 0 and float(row[4]) > 0 for row in rows)
    # Every keras_l2 row carries a verdict on the 1.03 target; Keras' own rows do not.
    assert [len(row) == 6 and row[5] in ("met", "MISSED") for row in rows] == [False] * 4 + [True] * 8


def test_benchmark_rejects_unknown_variant():
    done = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "benchmark.py"), "--variants", "none,l3", "--rounds", "1"],
        capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=300,
    )
    assert done.returncode == 2 and "unknown variants ['l3']" in done.stderr


@pytest.mark.multiprocess
def test_store_race_reports_no_failure_through_open_store():
    done = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "store_race.py"), "--processes", "3", "--trials", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    trial, plain, locked = done.stdout.splitlines()[-1].split()
    assert trial == "0" and locked == "0/3" and plain.endswith("/3")


@pytest.mark.multiprocess  # starts an mlflow server (or a script): make test-multiprocess
def test_compare_routes_sgd_coincide_adam_decoupled_differs():
    done = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "compare_routes.py"), "--epochs", "3", "--hidden", "8,8"],
        capture_output=True, text=True, env=dict(os.environ, KERAS_BACKEND="tensorflow"), timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {(r[0], r[1]): float(r[3]) for r in (line.split() for line in done.stdout.splitlines())
            if len(r) == 6 and r[0] in ("sgd", "adam")}
    assert len(rows) == 8
    assert all(rows[("sgd", route)] < 1e-12 for route in ("loss", "coupled", "decoupled"))
    assert rows[("adam", "loss")] == 0.0 and rows[("adam", "coupled")] == 0.0
    assert rows[("adam", "decoupled")] > 1e-3  # the L2-vs-weight-decay gap


@pytest.mark.multiprocess  # starts an mlflow server (or a script): make test-multiprocess
def test_logger_overhead_prints_every_variant():
    done = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "logger_overhead.py"), "--rounds", "1", "--models", "digits"],
        capture_output=True, text=True, env=dict(os.environ, KERAS_BACKEND="tensorflow"), timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("digits")]
    assert [" ".join(line.split()[1:-7]) for line in rows] == ["no logger", "no logger (A/A)", "per epoch",
                                                               "every 10 steps"]
    assert float(rows[0].split()[-5]) == 1.0  # the baseline's wall ratio to itself
    hooks, delivery = zip(*((float(line.split()[-2]), float(line.split()[-1])) for line in rows), strict=True)
    assert hooks[:2] == delivery[:2] == (0.0, 0.0)  # no logger, no logger work
    assert all(value > 0 for value in hooks[2:] + delivery[2:])


@pytest.mark.multiprocess  # starts a script: make test-multiprocess
def test_stacked_benchmark_rejects_an_unknown_case_and_times_a_tiny_fit_only_round():
    done = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "stacked_benchmark.py"), "--cases", "digits,mnist"],
        capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=300,
    )
    assert done.returncode == 2 and "--cases: unknown ['mnist']; choose from ['digits', 'wide']" in done.stderr
    code = ("import sys; sys.path.insert(0, 'experiments'); import stacked_benchmark as b; "
            "times = b.fit_only(members=2, epochs=2, examples=64); "
            "print('ok', all(t > 0 for part in times.values() for t in part))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=300)
    assert done.returncode == 0 and "ok True" in done.stdout, done.stderr[-2000:]


def test_the_stacked_benchmarks_phases_time_a_fit_and_put_keras_back(monkeypatch):
    import collections

    import keras
    import numpy as np

    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import stacked_benchmark

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    x, y = np.zeros((8, 3)), np.eye(2)[np.arange(8) % 2]
    import gc

    from keras_l2 import MlflowL2Logger

    hooks = {name: vars(MlflowL2Logger)[name] for name in ("on_train_begin", "on_epoch_end", "on_train_end")}
    callbacks = list(gc.callbacks)
    spent = collections.Counter()
    with stacked_benchmark.phases(spent):
        model.fit(x, y, validation_data=(x, y), epochs=2, verbose=0)
    assert spent["fit"] > spent["train steps"] + spent["validation"] and spent["train steps"] > 0
    assert spent["validation"] > 0
    assert not {"fit", "evaluate", "make_train_function"} & set(vars(keras.Model))  # Keras' own methods again
    assert {name: vars(MlflowL2Logger)[name] for name in hooks} == hooks and gc.callbacks == callbacks
    before = dict(spent)
    model.fit(x, y, epochs=1, verbose=0)
    assert spent == before
    with pytest.raises(RuntimeError, match="stop"), stacked_benchmark.phases(collections.Counter()):
        model.fit(x, y, epochs=1, verbose=0)
        raise RuntimeError("stop")
    assert not {"fit", "evaluate", "make_train_function"} & set(vars(keras.Model)) and gc.callbacks == callbacks


@pytest.mark.multiprocess  # starts a script (about 4 minutes): make test-multiprocess
def test_tune_on_the_default_digits_is_as_good_as_a_14_point_grid():
    # The quality bar for the default case: tune's validation data loss within 2% of the grid's best.
    # Its cost is a speed, measured by the script against a plain run of the same process and reported in the
    # README; a timed assertion here would test the machine.
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "tune_quality.py"), "--datasets", "digits",
                           "--seeds", "0"], cwd=ROOT, capture_output=True, text=True, timeout=1500,
                          env={**os.environ, "KERAS_BACKEND": "tensorflow"})
    assert done.returncode == 0, done.stderr[-2000:]
    row = next(line for line in done.stdout.splitlines() if line.startswith("| digits | 0 |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    ratio, cost = float(cells[6]), float(cells[7])
    assert ratio <= 1.02, row
    assert 0 < cost < float("inf"), row


@pytest.mark.multiprocess  # starts PostgreSQL and an MLflow server: make test-multiprocess
def test_server_request_cost_prints_the_cpu_of_both_sizes():
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "server_request_cost.py"), "--requests", "3"],
                          capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [int(row[0]) for row in rows] == [12, 120]
    assert all(float(row[1]) > 0 and float(row[2]) > 0 for row in rows)  # the server's CPU and wall ms a request
    # The split into a fixed and a per-metric cost is the line through the two sizes (to the printed rounding).
    (small, cpu_small, _), (large, cpu_large, _) = ((float(x) for x in row) for row in rows)
    fixed, per_metric = re.search(r"per request (-?[\d.]+) ms \+ per metric (-?[\d.]+) ms", done.stdout).groups()
    assert float(per_metric) == pytest.approx((cpu_large - cpu_small) / (large - small), abs=0.006)
    assert float(fixed) == pytest.approx(cpu_small - small * float(per_metric), abs=0.2)


def test_the_throughput_scripts_refuse_a_count_below_one_before_starting_anything():
    import tempfile

    def servers_folders():  # each script starts its team server in a folder of its own
        return {path for prefix in ("keras_l2_request_cost_", "keras_l2_throughput_")
                for path in Path(tempfile.gettempdir()).glob(f"{prefix}*")}

    before = servers_folders()
    for script, option in (("server_request_cost.py", "--requests"), ("study_throughput.py", "--rounds")):
        done = subprocess.run([sys.executable, str(ROOT / "experiments" / script), option, "0"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and f"{option}: must be an integer >= 1. Received: 0" in done.stderr, done.stderr
    assert servers_folders() == before
