"""Mixed precision: the penalty and the decay act on the float32 variables, on unscaled gradients.

Under `mixed_float16` Keras wraps whatever optimizer the model is compiled
with in a `LossScaleOptimizer` (loss scale 2**15 at the start). The penalty's
gradient must be scaled like the data gradient and unscaled with it, and the
decay must see unscaled gradients: scaled twice, it would be 32768 times too
strong; not at all, it would vanish. Either moves the weights by the whole
"effect of lambda" measured below, far beyond the tolerance. Run on
TensorFlow and JAX (marker `deploy`).

Tolerances, relative to each variable's largest weight, against the float32
run: 5e-3 for float16 (measured up to 1.1e-3 on TensorFlow and JAX) and 6e-2
for bfloat16 (8 bits of mantissa against float16's 11; measured up to 8.5e-3
on TensorFlow and 4.4e-2 on JAX with SGD, where Keras' own SGD `weight_decay`
drifts 3.3e-2 from its float32 run under the same policy).
"""

import keras
import numpy as np
import pytest

from keras_l2 import MlflowL2Logger, select_layers
from tests.helpers import ROUTES, compile_route, data, mlp, reset_keras, sqlite_store, weights

pytestmark = pytest.mark.deploy

N = 24
# Strong enough that the decay moves the weights far more than the precision does.
L2 = {"sgd": 3.0, "adam": 30.0}
TOLERANCE = {"mixed_float16": 5e-3, "mixed_bfloat16": 6e-2}
# Adam's sign-like steps make long low-precision trajectories chaotic once L2 has
# pulled weights to near zero (after 15 steps the float32 and float16 runs of
# Adam(0.05) with decoupled decay were 19% apart), so Adam runs 6 steps.
EPOCHS = {"sgd": 5, "adam": 2}
OPTIMIZERS = {"sgd": lambda: keras.optimizers.SGD(0.2), "adam": lambda: keras.optimizers.Adam(0.02)}


def _train(route, optimizer, policy, l2=None, callbacks=()):
    epochs = EPOCHS[optimizer]
    l2 = L2[optimizer] if l2 is None else l2
    keras.config.set_dtype_policy(policy)
    try:
        model = mlp(hidden=16)
        compile_route(model, route, OPTIMIZERS[optimizer](), l2, N, select_layers(model, names="hidden"))
        x, y = data()
        model.fit(x.astype("float32"), y.astype("float32"), batch_size=8, epochs=epochs, shuffle=False, verbose=0,
                  callbacks=list(callbacks))
        return model
    finally:
        keras.config.set_dtype_policy("float32")


def _relative_difference(a, b):
    return max(float(np.max(np.abs(p - q)) / np.max(np.abs(q))) for p, q in zip(a, b, strict=True))


# SGD shows a wrongly scaled term most directly; Adam is where coupled and decoupled differ.
CASES = [(route, "sgd") for route in ROUTES] + [("coupled", "adam"), ("decoupled", "adam")]


@pytest.fixture(scope="module")
def float32_runs():
    """Per (route, optimizer): the float32 weights, with lambda and without."""
    reset_keras()  # module fixtures run before conftest's per-test reset
    return {case: (weights(_train(*case, policy="float32")), weights(_train(*case, policy="float32", l2=0.0)))
            for case in CASES}


@pytest.mark.parametrize(("route", "optimizer"), CASES, ids=[f"{r}-{o}" for r, o in CASES])
@pytest.mark.parametrize("policy", sorted(TOLERANCE))
def test_mixed_trajectory_stays_close_to_float32(float32_runs, policy, route, optimizer):
    model = _train(route, optimizer, policy)
    reference, without_l2 = float32_runs[route, optimizer]

    if policy == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    hidden = model.get_layer("hidden")
    assert hidden.kernel.dtype == "float32" and hidden.compute_dtype == policy.removeprefix("mixed_")
    error = _relative_difference(weights(model), reference)
    effect = _relative_difference(without_l2, reference)
    assert error < TOLERANCE[policy]
    assert effect > 2 * TOLERANCE[policy]  # a lost (or 2**15 times too strong) decay would fail the line above


@pytest.mark.mlflow
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("policy", sorted(TOLERANCE))
def test_logger_under_mixed_precision(policy, route, tmp_path):
    """The logger reads the float32 kernels, and its run ends with the training."""
    import mlflow

    store = sqlite_store(tmp_path)
    logger = MlflowL2Logger(tracking_uri=store, max_delay=60, verbose=0)  # wait: the store is checked next
    model = _train(route, "sgd", policy, callbacks=[logger])
    client = mlflow.MlflowClient(store)
    assert client.get_run(logger.run_id).info.status == "FINISHED"
    last = max(client.get_metric_history(logger.run_id, "weight_norm/hidden"), key=lambda m: m.step)
    assert last.value == pytest.approx(np.linalg.norm(weights(model)[0].astype(np.float64)), rel=1e-6)


@pytest.mark.parametrize("route", ["regularizer", "loss"])
@pytest.mark.parametrize("policy", sorted(TOLERANCE))
def test_penalty_is_computed_in_float32(policy, route):
    model = _train(route, "sgd", policy)
    x, y = data()
    if route == "regularizer":
        (penalty,) = model.losses
    else:
        penalty = model.loss.penalty()
    assert keras.backend.standardize_dtype(penalty.dtype) == "float32"
    kernel = weights(model)[0].astype(np.float64)
    # float16 (10-bit mantissa) sums would be off by ~1e-3; float32 by ~1e-7.
    assert float(penalty) == pytest.approx(L2["sgd"] / N * np.sum(kernel**2), rel=2e-6)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("policy", sorted(TOLERANCE))
def test_penalty_inside_the_step_is_float32(policy, route):
    """One full-batch step: the in-graph `l2_penalty` (and, for the penalty routes, the
    loss minus the data loss) is the penalty of the float32 weights the step used."""
    from keras_l2 import attach_l2_metrics

    keras.config.set_dtype_policy(policy)
    try:
        model = mlp(hidden=16)
        compile_route(model, route, keras.optimizers.SGD(0.2), L2["sgd"], N, select_layers(model, names="hidden"))
        attach_l2_metrics(model)
        kernel = weights(model)[0].astype(np.float64)
        x, y = data()
        history = model.fit(x.astype("float32"), y.astype("float32"), batch_size=len(x), epochs=1, verbose=0).history
    finally:
        keras.config.set_dtype_policy("float32")
    expected = L2["sgd"] / N * np.sum(kernel**2)
    # Computed from the weights cast to the compute dtype instead, the penalty would be this far off:
    low = policy.removeprefix("mixed_")
    cast = L2["sgd"] / N * np.sum(keras.ops.convert_to_numpy(keras.ops.cast(kernel, low)).astype(np.float64) ** 2)
    assert abs(cast - expected) / expected > 10 * 2e-6  # measured: 5.9e-5 (float16), more for bfloat16
    assert history["l2_penalty"][0] == pytest.approx(expected, rel=2e-6)
    if route in ("regularizer", "loss"):  # the route's own penalty, inside its loss
        assert history["loss"][0] - history["data_loss"][0] == pytest.approx(expected, rel=5e-6)
