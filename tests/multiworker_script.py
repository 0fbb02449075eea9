"""One worker of the MultiWorkerMirroredStrategy test (test_multiworker.py).

Run as task 0 and task 1 of a 2-worker cluster on 127.0.0.1 that TF_CONFIG
describes (the test sets it), each process on one CPU device, so 2 replicas:

    python multiworker_script.py OUT_DIR STORE_URI

Writes under OUT_DIR:

- `mwms-<task>.npz`: the final weights of every route (and "none") with SGD
  and Adam trained under the strategy, keys `<route>-<optimizer>/<i>`;
- `single-<task>.npz`: the same trained on one device, outside any strategy
  (each task trains half of them);
- `report-<task>.json`: the run id of the MlflowL2Logger that trained
  `LOGGED` under the strategy, logging to STORE_URI, and timings. Task 1 also
  trains `LOGGED` on one device with a logger to the experiment
  `REFERENCE_EXPERIMENT` of the same store: what the strategy's run must
  equal (a store of its own would cost another ~5 s of schema migrations).
"""

import ctypes
import json
import os
import signal
import sys
import time

started = time.perf_counter()
# Never an orphan, even while TensorFlow blocks in C++ holding the GIL (as it
# does waiting for the other worker): the kernel ends this process LIFETIME s
# from now (SIGALRM's default action), or when the test that started it dies
# (PR_SET_PDEATHSIG, Linux). The test itself kills both workers after 300 s.
LIFETIME = 330  # past the test's own 300 s, so that its timeout, not this, reports a hang
signal.alarm(LIFETIME)
if sys.platform == "linux":
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
os.environ["KERAS_BACKEND"] = "tensorflow"
import tensorflow as tf  # noqa: E402

# Before anything initialises TensorFlow: collective ops are configured at
# startup. RING is what AUTO picks on CPU; the timeout turns a dead peer into
# an error instead of a hang.
STRATEGY = tf.distribute.MultiWorkerMirroredStrategy(
    communication_options=tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.RING, timeout_seconds=60
    )
)
_reduce = STRATEGY.reduce


def _reduce_each(reduce_op, value, axis=None):
    """`STRATEGY.reduce` working around two bugs of Keras 3's TF trainer under MWMS.

    Without it `fit` fails with more than one worker (Keras 3.15, TF 2.21;
    the second error is tensorflow/tensorflow#72388):
    - `_maybe_symbolic_build` reduces a whole `(x, y)` batch in one call, but
      MWMS reduces one value only ("Attempt to convert a value (PerReplica
      ...)"): reduce each value, as MirroredStrategy effectively does;
    - `reduce_per_replica` averages the step's scalar logs with `axis=0`
      ("Invalid reduction dimension 0 for input with 0 dimensions"): average a
      scalar across replicas only.
    The training step does not come here (the optimizer all-reduces the
    gradients); a metric's cross-worker read does, one value at a time, as
    before.
    """

    def one(v):
        local = v.values[0] if isinstance(v, tf.distribute.DistributedValues) else v
        return _reduce(reduce_op, v, axis=None if local.shape.rank == 0 else axis)

    return tf.nest.map_structure(one, value)


STRATEGY.reduce = _reduce_each

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from keras_l2 import MlflowL2Logger, select_layers  # noqa: E402
from tests.helpers import ROUTES, compile_route, data, mlp, weights  # noqa: E402

OPTIMIZERS = {"sgd": lambda: keras.optimizers.SGD(0.5), "adam": lambda: keras.optimizers.Adam(0.05)}
CONFIGS = [(route, name) for route in (*ROUTES, "none") for name in OPTIMIZERS]
EXAMPLES, BATCH, EPOCHS, L2 = 32, 16, 3, 0.3
LOGGED = ("loss", "sgd")  # trained once more, with MlflowL2Logger
REFERENCE_EXPERIMENT = "single_device_reference"


def train(route, optimizer, strategy, callbacks=()):
    """`EPOCHS` epochs of `EXAMPLES` examples in batches of `BATCH`, unshuffled.

    With callbacks (the logger), as such; without, as 1 epoch over the
    examples repeated `EPOCHS` times: the same steps on the same batches, but
    under the strategy each epoch costs ~0.6 s of overhead (a new iterator of
    the distributed dataset, cross-worker reads of the metrics).
    """
    with strategy.scope():
        model = mlp()
        compile_route(model, route, OPTIMIZERS[optimizer](), L2, EXAMPLES, select_layers(model, names="hidden"))
    # The single-device run must not be distributed, nor the other one local.
    assert model.distribute_strategy.num_replicas_in_sync == strategy.num_replicas_in_sync
    x, y = data(examples=EXAMPLES)
    epochs = EPOCHS
    if not callbacks:
        x, y, epochs = np.tile(x, (EPOCHS, 1)), np.tile(y, (EPOCHS, 1)), 1
    # NumPy in, as a user would: Keras' TF trainer makes a dataset of global
    # batches of 16 with auto_shard_policy DATA, and the strategy's
    # `experimental_distribute_dataset` splits each into 2 per-replica
    # batches of 8, examples 0-7 to worker 0 and 8-15 to worker 1. So each
    # step uses the same 16 examples as the single-device step; the
    # gradients (each replica's loss divided by 2) are summed across workers.
    model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0, callbacks=list(callbacks))
    return model


def main():
    out, store = sys.argv[1:3]
    task = int(json.loads(os.environ["TF_CONFIG"])["task"]["index"])
    assert STRATEGY.num_replicas_in_sync == 2, STRATEGY.num_replicas_in_sync
    keras.config.set_floatx("float64")
    timings = {"startup": time.perf_counter() - started}

    t = time.perf_counter()
    result = {}
    for route, name in CONFIGS:
        model = train(route, name, STRATEGY)
        result.update({f"{route}-{name}/{i}": w for i, w in enumerate(weights(model))})
    np.savez(os.path.join(out, f"mwms-{task}.npz"), **result)
    timings["mwms"] = time.perf_counter() - t

    t = time.perf_counter()
    logger = MlflowL2Logger(tracking_uri=store, verbose=0)
    train(*LOGGED, STRATEGY, callbacks=[logger])
    report = {"run_id": logger.run_id, "delivered": logger.flush()}
    timings["logger"] = time.perf_counter() - t

    t = time.perf_counter()
    single = tf.distribute.get_strategy()  # the default strategy: one device
    result = {}
    for route, name in CONFIGS[task::2]:
        model = train(route, name, single)
        result.update({f"{route}-{name}/{i}": w for i, w in enumerate(weights(model))})
    np.savez(os.path.join(out, f"single-{task}.npz"), **result)
    timings["single"] = time.perf_counter() - t
    if task == 1:
        t = time.perf_counter()
        reference = MlflowL2Logger(tracking_uri=store, experiment_name=REFERENCE_EXPERIMENT, verbose=0)
        train(*LOGGED, single, callbacks=[reference])
        report.update(reference_run_id=reference.run_id, reference_delivered=reference.flush())
        timings["reference"] = time.perf_counter() - t
    report["timings"] = timings
    with open(os.path.join(out, f"report-{task}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
