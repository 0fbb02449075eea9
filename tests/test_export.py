"""`model.export` (SavedModel) of a model trained with any route serves without keras_l2.

The serving process (tests/serve_script.py) has TensorFlow only, with
keras_l2 made unimportable, and its predictions must equal the trained
model's. The SavedModel files must not mention keras_l2 at all.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_l2 import LambdaScheduler, MlflowL2Logger, select_layers
from tests.helpers import ROUTES, compile_route, data, mlp, reset_keras, sqlite_store

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                reason="model.export writes a SavedModel through TensorFlow")

SCRIPT = Path(__file__).with_name("serve_script.py")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Per route: (export directory, the trained model's predictions); and the inputs."""
    reset_keras()  # module fixtures run before conftest's per-test reset
    root = tmp_path_factory.mktemp("export")
    x, y = data()
    inputs = data(7, seed=5)[0].astype("float32")
    models = {}
    for route in ROUTES:
        model = mlp()
        compile_route(model, route, keras.optimizers.Adam(0.05), 0.3, len(x), select_layers(model))
        # Everything keras_l2 can put on a training run, so that none of it leaks.
        callbacks = [LambdaScheduler([0.3, 0.1]),
                     MlflowL2Logger(tracking_uri=sqlite_store(root), max_delay=60, verbose=0)]
        model.fit(x.astype("float32"), y.astype("float32"), batch_size=8, epochs=2, verbose=0, callbacks=callbacks)
        path = root / route
        model.export(str(path), verbose=False)
        models[route] = (path, np.asarray(model.predict(inputs, verbose=0)))
    np.save(root / "inputs.npy", inputs)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    paths = [str(path) for path, _ in models.values()]
    done = subprocess.run([sys.executable, str(SCRIPT), str(root / "inputs.npy"), *paths],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return models, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("route", ROUTES)
def test_exported_model_serves_without_keras_l2(exported, route):
    models, served = exported
    path, expected = models[route]
    # The serving process ran to the end with `import keras_l2` raising (see serve_script.py).
    np.testing.assert_allclose(served[str(path)], expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("route", ROUTES)
def test_saved_model_does_not_mention_keras_l2(exported, route):
    path, _ = exported[0][route]
    files = [f for f in Path(path).rglob("*") if f.is_file()]
    assert any(f.name == "saved_model.pb" for f in files)
    assert not [f.name for f in files if b"keras_l2" in f.read_bytes() or b"L2Decay" in f.read_bytes()]
