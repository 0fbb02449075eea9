"""XLA (`jit_compile=True`) gives every route the trajectory it has without XLA.

Run on TensorFlow and on JAX (marker `deploy`). In float64 the two
compilations may still sum in a different order, so weights agree to 1e-12,
not bit for bit; a wrong penalty moves them far more (lambda doubled: more
than 1e-3 for the coupled route with Adam, which the control test pins).
"""

import keras
import numpy as np
import pytest

from keras_l2 import MlflowL2Logger, select_layers
from tests.helpers import ROUTES, compile_route, data, mlp, sqlite_store, weights

pytestmark = pytest.mark.deploy

L2, N = 0.3, 24
OPTIMIZERS = {"sgd": lambda: keras.optimizers.SGD(0.5, momentum=0.5), "adam": lambda: keras.optimizers.Adam(0.05)}


def _train(route, optimizer, jit, l2=L2, callbacks=()):
    model = mlp()
    compile_route(model, route, OPTIMIZERS[optimizer](), l2, N, select_layers(model, names="hidden"),
                  jit_compile=jit)
    x, y = data()
    history = model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=list(callbacks))
    return model, history.history


def _largest_difference(a, b):
    return max(float(np.max(np.abs(p - q))) for p, q in zip(a, b, strict=True))


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("route", (*ROUTES, "none"))
def test_xla_trajectory_equals_plain(float64, route, optimizer):
    with_xla, history_xla = _train(route, optimizer, jit=True)
    plain, history_plain = _train(route, optimizer, jit=False)
    assert with_xla.jit_compile is True and plain.jit_compile is False
    assert _largest_difference(weights(with_xla), weights(plain)) < 1e-12
    np.testing.assert_allclose(history_xla["loss"], history_plain["loss"], rtol=1e-12)


def test_xla_control_a_wrong_penalty_is_seen(float64):
    """The tolerance above is 1e9 times smaller than the effect of a wrong lambda."""
    right, _ = _train("coupled", "adam", jit=True)
    wrong, _ = _train("coupled", "adam", jit=True, l2=2 * L2)
    assert _largest_difference(weights(right), weights(wrong)) > 1e-3


@pytest.mark.mlflow
@pytest.mark.parametrize("route", ROUTES)
def test_logger_under_xla(float64, tmp_path, route):
    import mlflow

    store = sqlite_store(tmp_path)
    logger = MlflowL2Logger(tracking_uri=store, log_every_n_steps=2, max_delay=60, verbose=0)
    model, history = _train(route, "adam", jit=True, callbacks=[logger])
    client = mlflow.MlflowClient(store)
    norms = client.get_metric_history(logger.run_id, "weight_norm/hidden")
    final = np.linalg.norm(keras.ops.convert_to_numpy(model.get_layer("hidden").kernel))
    assert [m.step for m in sorted(norms, key=lambda m: m.step)] == [0, 1, 2, 3]
    assert max(norms, key=lambda m: m.step).value == pytest.approx(final, rel=1e-12)
    penalty = sorted(client.get_metric_history(logger.run_id, "l2_penalty"), key=lambda m: m.step)
    assert [m.step for m in penalty] == [1, 2, 3] and all(m.value > 0 for m in penalty)
    if route in ("regularizer", "loss"):
        data_loss = sorted(client.get_metric_history(logger.run_id, "data_loss"), key=lambda m: m.step)
        np.testing.assert_allclose([p.value + d.value for p, d in zip(penalty, data_loss, strict=True)],
                                   history["loss"], rtol=1e-12)
