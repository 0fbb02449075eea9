"""Resolving and opening the MLflow store, on real SQLite stores."""

import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest

from keras_l2.tracking.store import check_tracking_uri, experiment_id, open_store, resolve_store


@pytest.fixture
def no_user_uri(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(None)
    yield tmp_path
    mlflow.set_tracking_uri(None)


def test_embedded_default_is_sqlite_under_mlruns(no_user_uri):
    store = resolve_store()
    assert store.embedded
    assert store.tracking_uri == f"sqlite:///{no_user_uri / 'mlruns' / 'mlflow.db'}"
    assert store.artifact_location == (no_user_uri / "mlruns" / "artifacts").as_uri()
    client = open_store(store)
    eid = experiment_id(client, "lambda-sweep", store)
    assert experiment_id(client, "lambda-sweep", store) == eid
    run = client.create_run(eid)
    client.log_metric(run.info.run_id, "lambda", 0.01, step=0)
    client.set_terminated(run.info.run_id)
    assert (no_user_uri / "mlruns" / "mlflow.db").is_file()
    again = mlflow.MlflowClient(tracking_uri=store.tracking_uri)
    assert [m.value for m in again.get_metric_history(run.info.run_id, "lambda")] == [0.01]
    assert again.get_experiment(eid).artifact_location == store.artifact_location


def test_user_uri_from_environment_is_honoured(no_user_uri, monkeypatch):
    uri = f"sqlite:///{no_user_uri / 'team.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    store = resolve_store()
    assert store == type(store)(tracking_uri=uri)
    assert not (no_user_uri / "mlruns").exists()


def test_user_uri_from_set_tracking_uri_is_honoured(no_user_uri):
    mlflow.set_tracking_uri("http://127.0.0.1:5000")
    assert resolve_store().tracking_uri == "http://127.0.0.1:5000"
    assert resolve_store(tracking_uri="sqlite:////tmp/explicit.db").tracking_uri == "sqlite:////tmp/explicit.db"


@pytest.mark.parametrize("uri", ["", "   ", "not a uri", "ftp://host/db", "sqlite://relative.db", "sqlite:///",
                                 "http://", "http://host:notaport", "https://:5000", 5000, None])
def test_malformed_uri_is_refused_with_what_is_allowed(uri):
    with pytest.raises(ValueError, match="Allowed: sqlite:///") as info:
        check_tracking_uri(uri)
    assert f"tracking_uri={uri!r}" in str(info.value)


def test_unwritable_mlruns_is_refused_before_training(no_user_uri):
    (no_user_uri / "mlruns").write_text("a file where the store's directory should be")
    with pytest.raises(ValueError, match="needs a writable directory") as info:
        resolve_store()
    assert str(no_user_uri / "mlruns") in str(info.value) and "MLFLOW_TRACKING_URI" in str(info.value)


@pytest.mark.multiprocess
def test_processes_opening_a_new_store_at_once_lose_nothing(tmp_path):
    """MLflow's schema migration races on a brand-new SQLite store; the lock prevents it."""
    worker = textwrap.dedent(f"""
        import sys
        from keras_l2.tracking.store import TrackingStore, experiment_id, open_store
        store = TrackingStore(tracking_uri="sqlite:///{tmp_path / 'shared' / 'mlflow.db'}")
        client = open_store(store)
        eid = experiment_id(client, "race", store)
        run = client.create_run(eid, run_name="worker-" + sys.argv[1])
        for step in range(5):
            client.log_metric(run.info.run_id, "m", float(step), step=step)
        client.set_terminated(run.info.run_id)
    """)
    script = tmp_path / "worker.py"
    script.write_text(worker)
    procs = [subprocess.Popen([sys.executable, str(script), str(i)], stderr=subprocess.PIPE, text=True)
             for i in range(4)]
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-2000:]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"worker-{i}" for i in range(4)]
    for run in runs:
        assert [m.value for m in client.get_metric_history(run.info.run_id, "m")] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert Path(tmp_path / "shared" / "mlflow.db.lock").exists()
