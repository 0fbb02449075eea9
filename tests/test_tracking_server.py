"""The logger against a real `mlflow server` that dies and comes back, or is never there."""

import collections
import json
import logging
import subprocess
import sys
import textwrap
import threading
import time

import keras
import mlflow
import numpy as np
import pytest

from keras_l2 import MlflowL2Logger, select_layers, send_pending
from tests.helpers import compile_route, data, mlp
from tests.mlflow_server import MlflowServer, free_port

EPOCHS = 10
EPOCH_KEYS = ("loss", "data_loss", "l2_penalty", "regularized_loss", "lambda", "weight_norm/hidden",
              "weight_norm/out")


class TimedLogger(MlflowL2Logger):
    """Records how long each of the logger's hooks held up training."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.held = collections.defaultdict(list)

    def _timed(name):  # noqa: N805 - a decorator factory used in the class body
        def hook(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return getattr(MlflowL2Logger, name)(self, *args, **kwargs)
            finally:
                self.held[name].append(time.perf_counter() - start)

        return hook

    on_train_begin = _timed("on_train_begin")
    on_epoch_end = _timed("on_epoch_end")
    on_train_batch_end = _timed("on_train_batch_end")
    on_train_end = _timed("on_train_end")


class Slow(keras.callbacks.Callback):
    """Makes each epoch last long enough for an outage to span several."""

    def on_epoch_end(self, epoch, logs=None):
        time.sleep(0.4)


class Outage(keras.callbacks.Callback):
    """Kills the server after epoch `down`, restarts it after epoch `up`."""

    def __init__(self, server, down, up):
        super().__init__()
        self.server, self.down, self.up = server, down, up
        self.restart = None

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.down:
            self.server.kill()
        if epoch == self.up:
            # Starting takes seconds; training goes on meanwhile.
            self.restart = threading.Thread(target=self.server.start)
            self.restart.start()
        if epoch == EPOCHS - 2 and self.restart is not None:
            self.restart.join()  # the test's own wait: the server must be back before fit ends


def _model():
    model = mlp()
    compile_route(model, "regularizer", keras.optimizers.SGD(0.05), 0.1, 24, select_layers(model))
    return model


def _assert_every_epoch_once(client, run_id):
    for key in EPOCH_KEYS:
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        expected = list(range(EPOCHS + 1)) if key in ("lambda",) or key.startswith("weight_norm") else \
            list(range(1, EPOCHS + 1))
        assert steps == expected, (key, steps)


@pytest.mark.multiprocess  # starts an mlflow server (or a script): make test-multiprocess
def test_server_killed_and_restarted_mid_fit_loses_and_duplicates_nothing(tmp_path, caplog):
    x, y = data(24)
    with MlflowServer(tmp_path / "server") as server, caplog.at_level(logging.WARNING, logger="keras_l2"):
        logger = TimedLogger(tracking_uri=server.uri, max_delay=5.0, verbose=0, spool_dir=tmp_path / "spool")
        outage = Outage(server, down=1, up=3)
        started = time.perf_counter()
        history = _model().fit(x, y, epochs=EPOCHS, verbose=0, callbacks=[logger, outage, Slow()])
        elapsed = time.perf_counter() - started
        assert len(history.history["loss"]) == EPOCHS  # fit returned normally
        # Training was never held up by the outage: every hook returned at
        # once, the final flush within max_delay.
        assert max(logger.held["on_epoch_end"]) < 0.5, logger.held["on_epoch_end"]
        assert max(logger.held["on_train_batch_end"]) < 0.5
        assert logger.held["on_train_end"][0] < 5.0 + 1.0
        assert server.healthy()
        client = mlflow.MlflowClient(server.uri)
        run = client.get_run(logger.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["l2.route"] == "regularizer"
        _assert_every_epoch_once(client, logger.run_id)
        losses = [m.value for m in sorted(client.get_metric_history(logger.run_id, "loss"), key=lambda m: m.step)]
        np.testing.assert_allclose(losses, history.history["loss"], rtol=1e-6)
    assert caplog.text.count("cannot reach the MLflow store") == 1  # said once, clearly
    assert "reachable again" in caplog.text
    assert not list((tmp_path / "spool").glob("*.jsonl"))  # everything delivered, nothing left behind
    print(f"fit with a {EPOCHS}-epoch outage took {elapsed:.1f} s")


@pytest.mark.multiprocess  # starts an mlflow server (or a script): make test-multiprocess
def test_server_down_from_the_start_trains_to_the_end_and_delivers_later(tmp_path):
    # A separate process trains while nothing listens on the port and exits;
    # its records survive it in the spool and reach the server once it is up.
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    spool = tmp_path / "spool"
    script = textwrap.dedent(f"""
        import time, keras, numpy as np
        from keras_l2 import MlflowL2Logger, regularize, select_layers
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(6, activation="relu", name="hidden"),
                                  keras.layers.Dense(3, activation="softmax", name="out")])
        regularize(model, l2=0.1, n=24)
        model.compile(optimizer="sgd", loss="categorical_crossentropy")
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(24, 5)), np.eye(3)[rng.integers(0, 3, 24)]
        logger = MlflowL2Logger(tracking_uri="{uri}", max_delay=2.0, spool_dir="{spool}", verbose=0)
        start = time.perf_counter()
        model.fit(x, y, epochs={EPOCHS}, verbose=0, callbacks=[logger])
        print("FIT_SECONDS", time.perf_counter() - start, flush=True)
    """)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    process_seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    fit_seconds = float(done.stdout.split("FIT_SECONDS")[1].split()[0])
    # The tracking server's absence cost at most max_delay (2 s) plus slack,
    # where MLflow's own client would block for minutes per call.
    baseline = subprocess.run(
        [sys.executable, "-c", script.replace("callbacks=[logger]", "callbacks=[]")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    baseline_fit = float(baseline.stdout.split("FIT_SECONDS")[1].split()[0])
    assert fit_seconds < baseline_fit + 2.0 + 2.0, (fit_seconds, baseline_fit)
    assert "cannot reach the MLflow store" in done.stderr
    assert "saved in" in done.stderr and str(spool) in done.stderr
    spooled = list(spool.glob("*.jsonl"))
    assert len(spooled) == 1
    records = [json.loads(line) for line in spooled[0].read_text().splitlines()[1:]]
    assert records[0]["op"] == "run" and records[-1] == {**records[-1], "op": "end", "status": "FINISHED"}

    with MlflowServer(tmp_path / "server", port=port) as server:
        assert send_pending(server.uri, spool_dir=spool, timeout=60) == 0
        assert not list(spool.glob("*.jsonl"))
        client = mlflow.MlflowClient(server.uri)
        experiment = client.get_experiment_by_name("keras_l2")
        runs = client.search_runs([experiment.experiment_id])
        assert len(runs) == 1
        assert runs[0].info.status == "FINISHED"
        assert runs[0].data.params["l2.lambda"] == "0.1"
        _assert_every_epoch_once(client, runs[0].info.run_id)
    print(f"process with the server down: {process_seconds:.1f} s (fit {fit_seconds:.1f} s, "
          f"fit without logger {baseline_fit:.1f} s)")


@pytest.mark.multiprocess  # starts an mlflow server (or a script): make test-multiprocess
def test_replaying_a_spool_twice_creates_no_duplicates(tmp_path):
    from keras_l2.tracking.outbox import Outbox
    from keras_l2.tracking.store import TrackingStore

    port = free_port()
    store = TrackingStore(f"http://127.0.0.1:{port}")
    first = Outbox(store, spool_dir=tmp_path / "spool", retry_interval=0.2)
    run = first.create_run("replay", run_name="r")
    first.log(run, metrics={"loss": 1.0, "nan_metric": float("nan")}, step=1, params={"a": 1})
    first.end_run(run, "FINISHED")
    assert not first.flush(timeout=1.0)
    first.close()
    # The same records twice, as after a crash between delivering and deleting.
    (tmp_path / "spool" / "copy.jsonl").write_text(first.spool_path.read_text())
    with MlflowServer(tmp_path / "server", port=port) as server:
        assert send_pending(server.uri, spool_dir=tmp_path / "spool", timeout=60) == 0
        assert not list((tmp_path / "spool").glob("*.jsonl"))
        client = mlflow.MlflowClient(server.uri)
        runs = client.search_runs([client.get_experiment_by_name("replay").experiment_id])
        assert len(runs) == 1
        assert [m.value for m in client.get_metric_history(runs[0].info.run_id, "loss")] == [1.0]
        assert np.isnan(runs[0].data.metrics["nan_metric"])


@pytest.mark.parametrize("max_delay", [0.0, 1.0])
def test_flush_never_waits_longer_than_asked(tmp_path, max_delay):
    logger = MlflowL2Logger(tracking_uri=f"http://127.0.0.1:{free_port()}", max_delay=max_delay, verbose=0,
                            spool_dir=tmp_path)
    started = time.perf_counter()
    _model().fit(*data(24), epochs=2, verbose=0, callbacks=[logger])
    assert time.perf_counter() - started < max_delay + 5.0


@pytest.mark.multiprocess  # starts an mlflow server (or a script): make test-multiprocess
def test_make_ui_serves_the_embedded_store(tmp_path):
    """`make ui` starts the MLflow UI on 127.0.0.1 over mlruns/, with a run logged there."""
    import os
    import signal
    import urllib.request
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    port = free_port()
    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"  # UI_STORE: the embedded layout, not the user's
    ui = subprocess.Popen(["make", "-s", "ui", f"UI_PORT={port}", f"UI_STORE={tmp_path / 'mlruns'}"], cwd=root,
                          start_new_session=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert ui.poll() is None, ui.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        else:
            raise AssertionError("make ui did not come up")
        # What the UI shows is the embedded store: an experiment created there is listed.
        name = f"ui-check-{port}"
        mlflow.MlflowClient(store).create_experiment(name)
        assert mlflow.MlflowClient(f"http://127.0.0.1:{port}").get_experiment_by_name(name) is not None
    finally:
        os.killpg(ui.pid, signal.SIGKILL)
        ui.wait(timeout=30)
