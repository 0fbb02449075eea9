"""Shared fixtures. The Keras backend comes from KERAS_BACKEND (set by `make test`)."""

import gc
import os
import shutil
import tempfile

# JAX silently computes in float32 unless x64 is enabled before it is imported.
os.environ.setdefault("JAX_ENABLE_X64", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# As in CI (where MLflow turns it off itself): its client sets and pops a variable from another
# thread, which races with MLflow's own requests (KeyError: '_MLFLOW_TELEMETRY_SESSION_ID').
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# JAX: `set_l2` and a new route clear JAX's in-memory caches (keras_l2.steps.retrace: models may share
# layers), and the tests do that hundreds of times, each time compiling the same programs again. One
# compilation cache on disk per test run, which pytest-xdist's workers (and the processes tests start)
# inherit, keeps what was compiled (the JAX suite took 192-207 s with it, 345 s without, before the
# metrics stopped clearing the caches too). Tracing happens as before; only XLA's work is kept.
_JAX_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _JAX_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="keras_l2-tests-jax-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import keras  # noqa: E402
import pytest  # noqa: E402

from tests.helpers import reset_keras  # noqa: E402


def pytest_collection_finish(session):
    """Moves what importing and collecting made out of the garbage collector's sight.

    Keras' `clear_session()`, run before every test, calls `gc.collect()`, which
    walks every object alive: with TensorFlow, JAX, MLflow and the test modules
    loaded that took 0.1-0.3 s per test, minutes of every `make test`. Objects a
    test makes are collected as before; only these, alive until the end anyway,
    are no longer walked.
    """
    gc.collect()
    gc.freeze()


def pytest_unconfigure(config):
    if _JAX_CACHE is not None:  # made by this process (with xdist: the controller, after its workers)
        shutil.rmtree(_JAX_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Each test starts from float32 defaults, a fixed seed and fresh layer names."""
    reset_keras()
    yield
    keras.config.set_floatx("float32")


@pytest.fixture
def float64():
    """Makes Keras build float64 layers, variables and losses for this test."""
    keras.config.set_floatx("float64")
    yield
    keras.config.set_floatx("float32")
