"""Each route under tf.distribute.MultiWorkerMirroredStrategy, 2 worker processes.

Two processes on 127.0.0.1 (multiworker_script.py, one CPU device each, so 2
replicas) train every route with SGD and Adam in float64; each must give the
single-device trajectory of the same global batches: the penalty neither
counted once per replica nor lost. MlflowL2Logger under the strategy must
leave one run in the store, its metrics those of the single-device run.
"""

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.multiprocess

SCRIPT = Path(__file__).with_name("multiworker_script.py")
ROUTES = ("regularizer", "loss", "coupled", "decoupled", "none")
OPTIMIZERS = ("sgd", "adam")
TIMEOUT = 300  # seconds for both workers: ~22 s on 2 idle cores, ~75 s on 2 cores shared with 3 busy processes
# float64 throughout; the all-reduce of 2 workers' gradients is one addition,
# the same on both workers (they end bit-identical). From one device they
# differ only in rounding (two sums of 8 examples, not one of 16): measured
# 1.1e-16 (SGD) and 1.7e-16 (Adam). Counting the penalty once per replica
# (keras_l2's per-replica scaling switched off) moves the loss and coupled
# routes by 0.04 to 0.07; doubling lambda moves every route by 3.5e-3 to 0.07.
TOLERANCE = 1e-12


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _stop(process):
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # its own session: the worker and anything it started
    process.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Runs the 2 workers to the end; returns the output directory."""
    out = tmp_path_factory.mktemp("multiworker")
    workers = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    args = [sys.executable, str(SCRIPT), str(out), f"sqlite:///{out}/store.db"]
    processes, logs = [], []
    try:
        for task in range(2):
            cwd = out / f"worker{task}"  # a spool of undelivered records would go under here
            cwd.mkdir()
            env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3",
                       TF_CONFIG=json.dumps({"cluster": workers, "task": {"type": "worker", "index": task}}))
            logs.append(open(cwd / "output.txt", "w"))  # closed below
            processes.append(subprocess.Popen(args, cwd=cwd, env=env, stdout=logs[-1], stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, start_new_session=True))
        deadline = time.monotonic() + TIMEOUT
        # Until both are done, one fails (the other would wait for it) or time is up.
        while any(p.poll() is None for p in processes) and all(p.poll() in (None, 0) for p in processes):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        timed_out = any(p.poll() is None for p in processes) and time.monotonic() > deadline
    finally:
        for process in processes:
            _stop(process)
        for log in logs:
            log.close()
    codes = [p.returncode for p in processes]
    if any(codes):
        what = f"timed out after {TIMEOUT} s" if timed_out else "failed"
        tails = {task: (out / f"worker{task}" / "output.txt").read_text()[-3000:] for task in range(2)}
        output = "\n".join(f"--- worker {task}, exit {code}:\n{tails[task]}" for task, code in enumerate(codes) if code)
        pytest.fail(f"the workers {what} (exit codes {codes}; -9: stopped by this test):\n{output}")
    return out


@pytest.fixture(scope="module")
def trained(cluster):
    mwms = [dict(np.load(cluster / f"mwms-{task}.npz")) for task in range(2)]
    single = {**np.load(cluster / "single-0.npz"), **np.load(cluster / "single-1.npz")}
    return mwms, single


def _config(arrays, key):
    return [arrays[k] for k in sorted((k for k in arrays if k.split("/")[0] == key), key=lambda k: int(k[-1]))]


def _max_difference(a, b):
    assert len(a) == len(b) == 4
    return max(float(np.max(np.abs(p - q))) for p, q in zip(a, b, strict=True))


@pytest.mark.parametrize("route", ROUTES)
def test_two_workers_match_single_device(trained, route):
    mwms, single = trained
    differences = {o: _max_difference(_config(mwms[0], f"{route}-{o}"), _config(single, f"{route}-{o}"))
                   for o in OPTIMIZERS}
    assert max(differences.values()) < TOLERANCE, differences


def test_workers_hold_the_same_weights(trained):
    mwms, _ = trained
    assert mwms[0].keys() == mwms[1].keys()
    assert all(np.array_equal(mwms[0][k], mwms[1][k]) for k in mwms[0])


def test_the_penalty_changes_the_weights(trained):
    """The comparison above can fail: lambda moves the weights far more than TOLERANCE."""
    mwms, _ = trained
    differences = {f"{r}-{o}": _max_difference(_config(mwms[0], f"{r}-{o}"), _config(mwms[0], f"none-{o}"))
                   for r in ROUTES[:-1] for o in OPTIMIZERS}
    assert min(differences.values()) > 1e-3, differences


@pytest.fixture(scope="module")
def store(cluster):
    import mlflow

    reports = [json.loads((cluster / f"report-{task}.json").read_text()) for task in range(2)]
    return reports, mlflow.MlflowClient(tracking_uri=f"sqlite:///{cluster}/store.db")


def _histories(client, run):
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            for key in run.data.metrics}


def test_logger_logs_one_run_per_fit(store):
    """Only the chief logs: the other worker's run would duplicate every record."""
    from mlflow.entities import ViewType

    reports, client = store
    experiments = {e.experiment_id: e.name for e in client.search_experiments(view_type=ViewType.ALL)}
    runs = client.search_runs(list(experiments), run_view_type=ViewType.ALL)
    found = sorted((experiments[r.info.experiment_id], r.info.run_id, r.info.status) for r in runs)
    # Beside the single-device reference of multiworker_script.py, the chief's run only.
    assert found == [("keras_l2", reports[0]["run_id"], "FINISHED"),
                     ("single_device_reference", reports[1]["reference_run_id"], "FINISHED")]


def test_logged_run_equals_the_single_device_run(store):
    """The chief's run holds every epoch's metrics once, those of one device, and the same params."""
    reports, client = store
    assert reports[0]["delivered"] and reports[1]["reference_delivered"]
    run = client.get_run(reports[0]["run_id"])
    reference = client.get_run(reports[1]["reference_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params == reference.data.params
    assert {k: v for k, v in run.data.tags.items() if k.startswith("l2.")} == {
        k: v for k, v in reference.data.tags.items() if k.startswith("l2.")}
    logged, expected = _histories(client, run), _histories(client, reference)
    assert {"loss", "data_loss", "l2_penalty", "regularized_loss", "lambda", "weight_norm/hidden"} <= expected.keys()
    assert sorted(logged) == sorted(expected)
    for key, points in expected.items():
        steps = [step for step, _ in logged[key]]
        assert steps == [step for step, _ in points], key  # every epoch once: no step twice, none missing
        assert steps[-3:] == [1, 2, 3], key
        for (_, value), (_, want) in zip(logged[key], points, strict=True):
            assert math.isclose(value, want, rel_tol=TOLERANCE, abs_tol=1e-15), (key, logged[key], points)
