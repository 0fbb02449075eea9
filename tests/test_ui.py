"""The MLflow UI over a sweep's store, checked in headless Chromium as a person would look at it."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest

from keras_l2 import search as sweep
from keras_l2.tracking.store import ui_page
from tests.mlflow_server import MlflowServer

pytestmark = pytest.mark.ui
ROOT = Path(__file__).resolve().parent.parent
# Beside `make sweep`'s plots (ignored by git): copied by hand to docs/images/ when the README should change.
SCREENSHOT = ROOT / "experiments" / "results" / "mlflow_ui_compare.png"
LAMBDAS = (0.0, 0.1, 1.0)


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "Debian's chromium is needed: `make test-ui` installs it (apt-get install chromium)"
    return found


def _browse(url: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--hide-scrollbars", "--window-size=1400,1100", "--virtual-time-budget=20000", *extra, url],
        capture_output=True, text=True, timeout=180,
    )


def test_child_runs_and_their_lambdas_are_on_the_page(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = sweep.run_sweep(sweep.SweepConfig(lambdas=LAMBDAS, hidden=(16, 16), epochs=3, tracking_uri=store,
                                               results_dir=str(tmp_path / "results"), verbose=0))
    with MlflowServer(tmp_path / "server", store=store) as server:
        client = mlflow.MlflowClient(server.uri)
        parent = client.get_run(result["parent_run_id"])
        children = client.search_runs([parent.info.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                      order_by=["params.`l2.lambda` DESC"])
        ids = json.dumps([c.info.run_id for c in children]).replace(" ", "")
        url = f"{server.uri}/#/compare-runs?runs={ids}&experiments=[\"{parent.info.experiment_id}\"]"
        page = _browse(url, "--dump-dom")
        assert page.returncode == 0, page.stderr[-2000:]
        text = re.sub(r"\|+", "|", re.sub(r"<[^>]+>", "|", page.stdout))
        for child in children:
            assert child.info.run_name in text  # "l2=0.1 seed=0"
        # The parameters table: the l2.lambda row holds every child's value, in column order.
        row = text[text.rindex("|l2.lambda|") + len("|l2.lambda|"):].split("|l2.layers|")[0]
        assert row.split("|")[: len(children)] == [c.data.params["l2.lambda"] for c in children]
        # The page the sweep's last lines link: the experiment's runs in the model-training view (MLflow 3 opens
        # in its GenAI view, which lists traces, not runs), with the parent run in the list.
        page = _browse(server.uri + ui_page(experiment_id=parent.info.experiment_id), "--dump-dom")
        assert page.returncode == 0, page.stderr[-2000:]
        text = re.sub(r"\|+", "|", re.sub(r"<[^>]+>", "|", page.stdout))
        assert parent.info.run_name in text and "|Runs|" in text, text[:3000]
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shot = _browse(url, f"--screenshot={SCREENSHOT}")
        assert shot.returncode == 0, shot.stderr[-2000:]
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
