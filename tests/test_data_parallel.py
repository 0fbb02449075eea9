"""Each route under JAX's `keras.distribution.DataParallel` on 2 host devices.

data_parallel_script.py runs in fresh JAX processes (whatever KERAS_BACKEND
this suite runs under), with XLA splitting the host CPU into 2 devices. Every
route, and no L2, with SGD and Adam in float64 must follow the single-device
trajectory of the same global batches: the penalty neither counted once per
device nor lost. The run must really be distributed: every variable
replicated on both devices, every batch split 8 + 8 rows between them, and
the step's outputs coming back from both. `MlflowL2Logger` (logging every
step) must finish training there and log the per-epoch kernel norms and
penalty.

Tolerance: float64 throughout, and under DataParallel XLA sums each half
batch on its own device and adds the 2 partial sums (an all-reduce), where
one device sums the 16 examples in one pass: the trajectories may differ
only by where rounding happens (measured: at most 2.2e-16 on weights of
order 1 after 6 steps). 1e-12 leaves 4 orders of magnitude for that; a
penalty counted twice (the control below) moves the weights by ~0.1.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.multiprocess

SCRIPT = Path(__file__).with_name("data_parallel_script.py")
ROUTES = ("regularizer", "loss", "coupled", "decoupled")
OPTIMIZERS = ("sgd", "adam")
TOLERANCE = 1e-12
TIMEOUT = 300  # seconds for both processes (they take ~25 s and ~17 s of CPU)
STEPS, EPOCHS = 6, 3  # 32 examples in batches of 16, 3 epochs


def _environment():
    # XLA reads the device count when JAX initialises: set here, before the process starts.
    flags = os.environ.get("XLA_FLAGS", "")
    return dict(os.environ, KERAS_BACKEND="jax", JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=2".strip(), TF_CPP_MIN_LOG_LEVEL="3")


class _Script:
    """One run of the script; `result()` waits for it and returns its JSON, or fails the calling test."""

    def __init__(self, mode, cwd):
        self.mode, self.log = mode, cwd / f"{mode}.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen([sys.executable, str(SCRIPT), mode], cwd=cwd, env=_environment(),
                                            stdout=subprocess.PIPE, stderr=log, text=True,
                                            start_new_session=True)
        self._result = self._failure = None

    def result(self):
        if self._result is None and self._failure is None:
            self._finish()
        if self._failure is not None:
            pytest.fail(self._failure, pytrace=False)
        return self._result

    def _finish(self):
        try:
            stdout, _ = self.process.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.stop()
            self._failure = f"data_parallel_script.py {self.mode} ran over {TIMEOUT} s"
            return
        code = self.process.returncode
        if code != 0:
            how = f"died of signal {-code}" if code < 0 else f"exited with {code}"
            lines = self.log.read_text().splitlines(keepends=True)
            stderr = "".join(line for line in lines if not line.startswith(("I0000", "W0000", "WARNING: All log")))
            # A crash: the runtime's error and the threads' Python stacks (faulthandler), not the module list.
            runtime = "".join(line for line in lines if line.startswith("E") and "common_pjrt_client" in line)
            crash = stderr.find("Fatal Python error")
            excerpt = runtime[:1000] + stderr[crash : crash + 3000] if crash >= 0 else stderr[-3000:]
            self._failure = f"data_parallel_script.py {self.mode} {how} (log: {self.log}):\n{excerpt}"
            return
        line = next(line for line in reversed(stdout.splitlines()) if line.startswith("RESULT "))
        self._result = json.loads(line[len("RESULT "):])

    def stop(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Overrides conftest's: Keras runs in the subprocesses only, nothing here to reset (a clear_session per test)."""
    yield


@pytest.fixture(scope="module")
def scripts(tmp_path_factory):
    """Both processes at once (one per core): the trajectories, and the logger's runs."""
    started = {mode: _Script(mode, tmp_path_factory.mktemp(mode)) for mode in ("trajectories", "logger")}
    yield started
    for script in started.values():
        script.stop()




@pytest.mark.parametrize("route", [*ROUTES, "none"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_data_parallel_two_devices_matches_single_device(scripts, route, optimizer):
    # Results are read in the tests, not in fixtures: a crashed script fails the tests, not their setup.
    difference = scripts["trajectories"].result()["differences"][f"{route}-{optimizer}"]
    assert difference["weights"] < TOLERANCE  # after every epoch
    assert difference["loss"] < TOLERANCE  # every epoch's loss


def test_data_parallel_really_is_distributed(scripts):
    """Checked on the coupled route with Adam (one run of each kind)."""
    trajectories = scripts["trajectories"].result()
    parallel, single = trajectories["parallel"], trajectories["single"]
    # The model's, the optimizer's and the metrics' variables: a full copy on each device.
    assert parallel["variables"]["devices"] == [0, 1]
    assert parallel["variables"]["devices_per_variable"] == [2]
    assert parallel["variables"]["fully_replicated"]
    assert "NamedSharding" in parallel["variables"]["kernel_sharding"]
    # Every batch of 16 is split by rows, 8 on each device (the rows the data order gives),
    # and the step runs on both.
    assert len(parallel["batches"]) == STEPS
    for batch in parallel["batches"]:
        assert batch["shape"] == [16, 5] and batch["spec"] == "P('batch', None)"
        assert batch["shards"] == [{"device": 0, "rows": [0, 8], "match": True},
                                   {"device": 1, "rows": [8, 16], "match": True}]
        assert batch["output_devices"] == [0, 1]
    # What it is compared with runs on one device.
    assert single["variables"]["devices"] == [0] and single["variables"]["devices_per_variable"] == [1]
    assert all(batch["output_devices"] == [0] for batch in single["batches"])
    # And training moves the weights far more than the tolerance.
    assert parallel["moved"] > 0.1


def test_data_parallel_comparison_sees_a_doubled_lambda(scripts):
    """The control: with lambda doubled on the distributed side the comparison must fail."""
    trajectories = scripts["trajectories"].result()
    assert trajectories["control"]["weights"] > 1e-3
    assert trajectories["control"]["loss"] > 1e-4


@pytest.mark.parametrize("route", ROUTES)
def test_mlflow_logger_under_data_parallel(scripts, route):
    """Logging every step; each step reads the weights that the next step's JAX call donates.

    Failed before f3c644f: the step hook ran on Keras' batch-end worker thread
    and read the trainer's state after the next step had donated it; under
    DataParallel the process died (SIGSEGV, "Buffer has been deleted or
    donated"). Now the norms of step s are read when step s + 1 begins.
    """
    run = scripts["logger"].result()[route]
    assert run["delivered"] and run["status"] == "FINISHED"
    assert run["kernel_devices"] == [2, 2]
    norms = run["norms"]  # each kernel's norm after step 0 (initial), 1, ..., 6
    for index, name in enumerate(("hidden", "out")):
        assert np.isclose(norms[name][-1], run["final_norms"][index], rtol=TOLERANCE, atol=0)
        # Per epoch: the initial norm at step 0, then the norm at the end of each epoch.
        steps, values = zip(*run["weight_norm"][name], strict=True)
        assert list(steps) == list(range(EPOCHS + 1))
        np.testing.assert_allclose(values, norms[name][:: STEPS // EPOCHS], rtol=TOLERANCE, atol=0)
        assert np.isclose(values[-1], run["final_norms"][index], rtol=TOLERANCE, atol=0)
        # Every step is logged, with the norm after exactly that step.
        steps, values = zip(*run["step_weight_norm"][name], strict=True)
        assert list(steps) == list(range(1, STEPS + 1))
        np.testing.assert_allclose(values, norms[name][1:], rtol=TOLERANCE, atol=0)
    # The penalty: per epoch the mean of l2 / n * ||W_hidden||^2 at the weights each step used,
    # counted once although each device computes it; per step Keras' running epoch mean.
    penalties = np.asarray(run["step_penalties"])
    per_step = STEPS // EPOCHS
    epoch_means = penalties.reshape(EPOCHS, per_step).mean(axis=1)
    steps, values = zip(*run["l2_penalty"], strict=True)
    assert list(steps) == list(range(1, EPOCHS + 1))
    np.testing.assert_allclose(values, epoch_means, rtol=TOLERANCE, atol=0)
    np.testing.assert_allclose(values, run["history_l2_penalty"], rtol=TOLERANCE, atol=0)
    running = [penalties[s - s % per_step : s + 1].mean() for s in range(STEPS)]
    steps, values = zip(*run["step_l2_penalty"], strict=True)
    assert list(steps) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(values, running, rtol=TOLERANCE, atol=0)
