"""Each route under tf.distribute.MirroredStrategy gives the single-device trajectory.

The penalty must be neither counted once per replica nor lost. Before the
per-replica scaling, the loss and coupled routes were off by ~0.04 here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess

SCRIPT = Path(__file__).with_name("mirrored_script.py")


@pytest.fixture(scope="module")
def differences(tmp_path_factory):
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    store = tmp_path_factory.mktemp("store")
    done = subprocess.run([sys.executable, str(SCRIPT), str(store)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("route", ["regularizer", "loss", "coupled", "decoupled", "none"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_mirrored_strategy_two_replicas_matches_single_device(differences, route, optimizer):
    assert differences[f"{route}-{optimizer}"] < 1e-12


@pytest.mark.parametrize("route", ["regularizer", "coupled"])
def test_logger_under_mirrored_strategy_logs_what_a_single_device_logs(differences, route):
    logged = differences["logger"][route]
    mirrored, single = logged["mirrored"], logged["single"]
    assert len(mirrored["norms"]) == 4 and len(mirrored["penalty"]) == 3 and len(mirrored["step_norms"]) == 6
    assert mirrored["norms"][-1] == pytest.approx(mirrored["final_norm"], rel=1e-12)
    # The penalty is counted once, not once per replica.
    for key in ("norms", "penalty", "step_norms"):
        assert mirrored[key] == pytest.approx(single[key], rel=1e-12), key
