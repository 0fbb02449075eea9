"""Run by test_distribution.py in a fresh process: TensorFlow must split the CPU
into two logical devices before anything initialises it.

Prints, as JSON, the largest weight difference between a MirroredStrategy run
on 2 replicas and a single-device run of the same global batches, per route
and optimizer.
"""

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "tensorflow"
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from keras_l2 import select_layers  # noqa: E402
from tests.helpers import ROUTES, compile_route, data, mlp, weights  # noqa: E402

OPTIMIZERS = {"sgd": lambda: keras.optimizers.SGD(0.5), "adam": lambda: keras.optimizers.Adam(0.05)}


def train(route, make_optimizer, strategy, callbacks=(), model_out=None):
    with strategy.scope():
        model = mlp()
        compile_route(model, route, make_optimizer(), 0.3, 32, select_layers(model, names="hidden"))
    x, y = data(examples=32)
    model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0, callbacks=list(callbacks))
    if model_out is not None:
        model_out.append(model)
    return weights(model)


def logged(route, strategy, store):
    """What MlflowL2Logger (every step) stored, and the final kernel norm."""
    import mlflow

    from keras_l2 import MlflowL2Logger

    logger = MlflowL2Logger(tracking_uri=store, log_every_n_steps=1, max_delay=60, verbose=0)
    models = []
    train(route, OPTIMIZERS["adam"], strategy, callbacks=[logger], model_out=models)
    client = mlflow.MlflowClient(store)

    def history(key):
        return [m.value for m in sorted(client.get_metric_history(logger.run_id, key), key=lambda m: m.step)]

    kernel = models[0].get_layer("hidden").kernel
    return {"norms": history("weight_norm/hidden"), "penalty": history("l2_penalty"),
            "step_norms": history("step/weight_norm/hidden"),
            "final_norm": float(np.linalg.norm(keras.ops.convert_to_numpy(kernel)))}


keras.config.set_floatx("float64")
mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
single = tf.distribute.get_strategy()
result = {}
for route in (*ROUTES, "none"):
    for name, make in OPTIMIZERS.items():
        a, b = train(route, make, single), train(route, make, mirrored)
        result[f"{route}-{name}"] = max(float(np.max(np.abs(p - q))) for p, q in zip(a, b, strict=True))
store = f"sqlite:///{sys.argv[1]}/store.db"
result["logger"] = {route: {"mirrored": logged(route, mirrored, store), "single": logged(route, single, store)}
                    for route in ("regularizer", "coupled")}
print(json.dumps(result))
