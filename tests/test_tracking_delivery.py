"""Delivery through the delivery process: throughput, bounded waits, crashes, the spool's temporaries.

Each test pins a defect of the thread-based delivery it replaced (issue 10):
throughput capped near 500 points/s by fixed pacing, a train end that waited
twice `max_delay`, a `<uuid>.tmp` left in the spool by a process that died
mid-write, and the bare dict records and private MLflow REST internals.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import keras
import mlflow
import pytest

from keras_l2 import MlflowL2Logger, select_layers
from keras_l2.tracking.outbox import Outbox
from keras_l2.tracking.records import Log, coalesce
from keras_l2.tracking.store import TrackingStore
from tests.helpers import compile_route, data, mlp, sqlite_store
from tests.mlflow_server import MlflowServer, free_port

# The target is 5,000 points/s; MLflow's own client, 1000-metric `log_batch` calls back to back,
# reaches 4,300-7,500 here (a server below 5,000), so the test holds delivery to a share of that
# ceiling, measured on the same store in the same test. The old pacing (one request per 2 s) gave
# about 500 points/s, a tenth of the ceiling or less.
SHARE_OF_MLFLOW = 0.5


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with MlflowServer(tmp_path_factory.mktemp("server")) as running:
        yield running


def _store(kind, server, tmp_path) -> TrackingStore:
    return TrackingStore(server.uri if kind == "server" else sqlite_store(tmp_path))


def _mlflow_rate(uri: str, steps: int, keys: list) -> float:
    """Points/s of MLflow's own client on this store: 1000-metric `log_batch` calls back to back."""
    from mlflow.entities import Metric

    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment(f"reference-{time.time_ns()}")).info.run_id
    points = [Metric(key, step * 0.5, 0, step) for step in range(1, steps + 1) for key in keys]
    started = time.perf_counter()
    for start in range(0, len(points), 1000):
        client.log_batch(run_id, metrics=points[start:start + 1000])
    return len(points) / (time.perf_counter() - started)


@pytest.mark.multiprocess  # starts an mlflow server (or a script): make test-multiprocess
@pytest.mark.parametrize("kind", ["server", "sqlite"])
def test_a_healthy_store_keeps_up_with_mlflows_own_client(kind, server, tmp_path):
    # Was: requests 2 s apart with at most 1000 metrics each, about 500 points/s.
    outbox = Outbox(_store(kind, server, tmp_path), spool_dir=tmp_path / "spool")
    run = outbox.create_run("throughput")
    assert outbox.flush(60)  # the delivery process is up and the run exists: time the points alone
    steps, keys = 2000, [f"m{i}" for i in range(10)]
    started = time.perf_counter()
    for step in range(1, steps + 1):  # one record per step, as log_every_n_steps=1 makes them
        outbox.log(run, metrics={key: step * 0.5 for key in keys}, step=step)
    assert outbox.flush(60)
    rate = steps * len(keys) / (time.perf_counter() - started)
    outbox.end_run(run)
    assert outbox.close(60)
    client = mlflow.MlflowClient(outbox.store.tracking_uri)
    history = client.get_metric_history(outbox.run_id(run), "m9")
    assert sorted(m.step for m in history) == list(range(1, steps + 1))
    # MLflow's own client on the same store, same moment: the most any delivery can do on this machine.
    ceiling = _mlflow_rate(outbox.store.tracking_uri, steps, keys)
    print(f"{kind}: {rate:.0f} points/s delivered, MLflow's client alone {ceiling:.0f} points/s")
    assert rate >= SHARE_OF_MLFLOW * ceiling, (rate, ceiling)


@pytest.mark.multiprocess  # starts an mlflow server (or a script): make test-multiprocess
def test_train_end_waits_under_half_a_second_at_every_step_on_a_healthy_server(server, tmp_path):
    # Was: 3 s, with 3,014 records spooled and the run left RUNNING.
    from keras_l2.search.datasets import all_digits
    from keras_l2.search.models import build_model

    x, y = all_digits()
    waits = []

    class Timed(MlflowL2Logger):
        def on_train_end(self, logs=None):
            started = time.perf_counter()
            super().on_train_end(logs)
            waits.append(time.perf_counter() - started)

    model = build_model(64, 10, (256, 256), seed=0)
    compile_route(model, "regularizer", keras.optimizers.Adam(1e-3), 1e-3, len(x), select_layers(model))
    spool = tmp_path / "spool"
    warm = Timed(tracking_uri=server.uri, log_every_n_steps=1, verbose=0, spool_dir=spool)
    model.fit(x[:64], y[:64], batch_size=32, epochs=1, verbose=0, callbacks=[warm])  # trace, start delivery
    logger = Timed(tracking_uri=server.uri, log_every_n_steps=1, verbose=0, spool_dir=spool)
    model.fit(x, y, batch_size=32, epochs=3, verbose=0, callbacks=[logger])
    run = mlflow.MlflowClient(server.uri).get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    steps = 3 * -(-len(x) // 32)
    assert len(mlflow.MlflowClient(server.uri).get_metric_history(logger.run_id, "step/loss")) == steps
    assert not list(spool.glob("*.jsonl"))
    print(f"train-end wait {waits[-1] * 1e3:.0f} ms for {steps} logged steps")
    assert waits[-1] < 0.5, waits


def test_train_end_with_a_dead_server_waits_max_delay_once(tmp_path, capsys):
    # Was: with verbose=1, 2 x max_delay (the printed run id waited for the creation again).
    max_delay = 1.5
    logger = MlflowL2Logger(tracking_uri=f"http://127.0.0.1:{free_port()}", max_delay=max_delay, verbose=1,
                            spool_dir=tmp_path)
    model = mlp()
    compile_route(model, "regularizer", "sgd", 0.1, 24, select_layers(model))
    model.fit(*data(24), epochs=1, verbose=0, callbacks=[logger])
    started = time.perf_counter()
    logger.on_train_end()
    waited = time.perf_counter() - started
    assert "(pending delivery)" in capsys.readouterr().out
    assert waited < max_delay + 0.5, waited


def test_a_killed_delivery_process_loses_no_record(tmp_path):
    outbox = Outbox(TrackingStore(sqlite_store(tmp_path)), spool_dir=tmp_path / "spool")
    run = outbox.create_run("crash")
    outbox.log(run, metrics={"loss": 1.0}, step=1)
    assert outbox.flush(60)
    os.kill(outbox.delivery_pid, signal.SIGKILL)
    for step in range(2, 6):  # queued while the process is dead; the next job restarts it
        outbox.log(run, metrics={"loss": float(step)}, step=step)
    outbox.end_run(run)
    assert outbox.flush(60)
    client = mlflow.MlflowClient(outbox.store.tracking_uri)
    assert sorted(m.step for m in client.get_metric_history(outbox.run_id(run), "loss")) == [1, 2, 3, 4, 5]
    assert client.get_run(outbox.run_id(run)).info.status == "FINISHED"


def test_records_that_trickle_in_during_training_share_jobs_and_flush_does_not_wait_for_the_pacing(tmp_path):
    # Was: one job (one MLflow request, ~12 ms of the delivery process's CPU) per record as it came.
    from keras_l2.tracking import outbox as outbox_module

    outbox = Outbox(TrackingStore(sqlite_store(tmp_path)), spool_dir=tmp_path / "spool")
    run = _trickle(outbox, outbox_module._JOB_GAP_S)
    client = mlflow.MlflowClient(outbox.store.tracking_uri)
    with outbox._cond:
        outbox._next_job_at = time.monotonic() + 3600  # the next paced job is an hour away
    outbox.log(run, metrics={"loss": 0.0}, step=41)
    outbox.end_run(run)
    time.sleep(0.3)
    assert outbox.pending() == 2  # held by the pacing...
    assert outbox.flush(60)  # ...which a flush skips
    assert client.get_run(outbox.run_id(run)).info.status == "FINISHED"
    outbox.close()


@pytest.mark.multiprocess  # starts an mlflow server: make test-multiprocess
def test_a_server_gets_at_most_one_job_per_server_gap(server, tmp_path):
    # Was: a job every 0.5 s to a server too; each costs the team server ~20 ms of CPU that all workers share.
    from keras_l2.tracking import outbox as outbox_module

    outbox = Outbox(TrackingStore(server.uri), spool_dir=tmp_path / "spool")
    gap = outbox_module._SERVER_JOB_GAP_S
    assert gap >= 4 * outbox_module._JOB_GAP_S  # what the trickle below tells apart
    run = _trickle(outbox, gap)  # at the local gap, this would take 8 jobs or more
    with outbox._cond:
        outbox._next_job_at = time.monotonic() + 3600  # the next paced job is an hour away...
    for step in range(outbox_module._SERVER_BACKLOG):
        outbox.log(run, metrics={"loss": float(step)}, step=100 + step)
    deadline = time.monotonic() + 30
    while outbox.pending() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert outbox.pending() == 0  # ...but a backlog goes at once, without a flush
    outbox.end_run(run)
    assert outbox.flush(60)
    assert mlflow.MlflowClient(server.uri).get_run(outbox.run_id(run)).info.status == "FINISHED"
    outbox.close()


def _trickle(outbox, gap: float, records: int = 40) -> str:
    """Logs `records` metrics evenly over two pacing gaps of `gap` s to a new run; asserts they went in at most
    one job per gap (plus the one flush started), not one per record, and all arrived. Returns the run's key."""
    spread = 2 * gap
    run = outbox.create_run("pacing")
    assert outbox.flush(60)  # the delivery process is up and the run exists
    jobs, deliver = [], outbox._courier.deliver

    def counted(store, runs, batch, **kwargs):
        jobs.append(len(batch))
        return deliver(store, runs, batch, **kwargs)

    outbox._courier = type("Counted", (), {"deliver": staticmethod(counted), "ready": outbox._courier.ready,
                                           "warm": outbox._courier.warm})()
    for step in range(1, records + 1):
        outbox.log(run, metrics={"loss": float(step)}, step=step)
        time.sleep(spread / records)
    assert outbox.flush(60)
    assert sum(jobs) == records
    assert len(jobs) <= 4, jobs
    client = mlflow.MlflowClient(outbox.store.tracking_uri)
    assert sorted(m.step for m in client.get_metric_history(outbox.run_id(run), "loss")) == list(range(1, 41))
    return run


def test_a_process_that_dies_while_rewriting_the_spool_leaves_no_temporary(tmp_path):
    # Was: `<uuid>.tmp` stayed in the spool folder for good.
    spool, uri = tmp_path / "spool", f"http://127.0.0.1:{free_port()}"
    script = textwrap.dedent(f"""
        import os
        from keras_l2.tracking import spool
        from keras_l2.tracking.outbox import Outbox
        from keras_l2.tracking.store import TrackingStore
        outbox = Outbox(TrackingStore("{uri}"), spool_dir="{spool}", retry_interval=60)
        run = outbox.create_run("spool")
        outbox.log(run, metrics={{"loss": 1.0}}, step=1)
        outbox.flush(0.5)  # spooled
        outbox.log(run, metrics={{"loss": 2.0}}, step=2)
        spool.os.replace = lambda *args: os._exit(0)  # dies between writing the temporary and renaming it
        outbox.flush(0)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list(spool.glob("*.tmp"))) == 1  # the crash happened where it should
    adopter = Outbox(TrackingStore(uri), spool_dir=spool)
    assert adopter.adopt_spool() == 2  # the last complete spool: the run and its first point
    assert not list(spool.glob("*.tmp"))
    adopter.close()


def test_a_refused_param_does_not_take_metrics_down(tmp_path, caplog):
    outbox = Outbox(TrackingStore(sqlite_store(tmp_path)), spool_dir=tmp_path / "spool")
    run = outbox.create_run("params")
    outbox.log(run, params={"a": 1}, step=0)
    assert outbox.flush(60)
    outbox.log(run, metrics={"loss": 0.5}, params={"a": 2}, tags={"t": "x"}, step=1)  # one log_batch: refused
    assert outbox.flush(60)
    data_ = mlflow.MlflowClient(outbox.store.tracking_uri).get_run(outbox.run_id(run)).data
    assert data_.metrics == {"loss": 0.5} and data_.params == {"a": "1"} and data_.tags["t"] == "x"
    assert "params ['a'] refused" in caplog.text


def test_artifacts_go_through_the_queue_and_the_spool_keeps_their_path(tmp_path):
    (tmp_path / "notes.txt").write_text("lambda 0.1")
    outbox = Outbox(TrackingStore(sqlite_store(tmp_path)), spool_dir=tmp_path / "spool")
    run = outbox.create_run("artifacts")
    outbox.log_artifact(run, tmp_path / "notes.txt", artifact_path="docs")
    assert outbox.flush(60)
    client = mlflow.MlflowClient(outbox.store.tracking_uri)
    assert [a.path for a in client.list_artifacts(outbox.run_id(run), "docs")] == ["docs/notes.txt"]
    with pytest.raises(FileNotFoundError, match="local_path="):
        outbox.log_artifact(run, tmp_path / "missing.txt")

    dead = Outbox(TrackingStore(f"http://127.0.0.1:{free_port()}"), spool_dir=tmp_path / "dead")
    dead.log_artifact(dead.create_run("artifacts"), tmp_path / "notes.txt")
    assert not dead.close(0.2)
    lines = [json.loads(line) for line in dead.spool_path.read_text().splitlines()[1:]]
    assert lines[-1] == {"op": "artifact", "key": lines[0]["key"], "local_path": str(tmp_path / "notes.txt"),
                         "artifact_path": None}


def test_a_runs_metrics_params_and_tags_share_one_log_batch_within_mlflows_limits():
    logs = [Log("r", params=(("a", "1"),)), Log("r", tags=(("t", "x"),))]
    logs += [Log("r", metrics=tuple((f"m{i}", 1.0, 0, s) for i in range(10))) for s in range(150)]
    merged = coalesce(logs)
    assert [count for _, count in merged] == [101, 51]  # 2 + 99 x 10 = 992 entries (1000 at most), then the rest
    assert all(len(record.metrics) <= 1000 and record.size <= 1000 for record, _ in merged)
    assert merged[0][0].params == (("a", "1"),) and merged[0][0].tags == (("t", "x"),)
    assert [c for _, c in coalesce([Log("r", params=(("a", "1"),)), Log("r", params=(("a", "2"),))])] == [1, 1]


@pytest.mark.core
def test_batch_hooks_are_methods_and_never_block_keras_async_dispatch():
    plain, stepping = MlflowL2Logger(verbose=0, tracking_uri="sqlite:////tmp/unused.db"), MlflowL2Logger(
        verbose=0, tracking_uri="sqlite:////tmp/unused.db", log_every_n_steps=2)
    for logger in (plain, stepping):
        assert not {"on_train_batch_end", "on_train_batch_begin"} & set(vars(logger))
        callbacks = keras.callbacks.CallbackList([logger], model=mlp())
        # Keras runs batch ends on a worker thread where the backend allows it (JAX, PyTorch).
        assert callbacks._async_train == keras.src.backend.IS_THREAD_SAFE


def test_the_delivery_process_imports_neither_keras_nor_tensorflow(tmp_path):
    from keras_l2.tracking.courier import BOOTSTRAP

    job = {"job": 1, "store": {"tracking_uri": f"sqlite:///{tmp_path / 'm.db'}"}, "runs": {}, "records": [
        {"op": "run", "key": "k", "experiment": "e", "run_name": None, "tags": [], "start_time": 1}]}
    script = BOOTSTRAP + textwrap.dedent("""
        import sys
        import keras_l2.tracking.outbox  # what the training side imports for delivery
        from keras_l2.tracking.worker import main
        main()  # the delivery process's loop: serves stdin until it closes
        print("HEAVY", sorted(m for m in ("keras", "tensorflow", "jax", "torch") if m in sys.modules), file=sys.stderr)
    """)
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps(job) + "\n", capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["done"] == 1  # it delivered: MLflow was imported, Keras was not
    assert "HEAVY []" in done.stderr
