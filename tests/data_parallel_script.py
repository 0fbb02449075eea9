"""Run by test_data_parallel.py in a fresh process: XLA must split the host into
two CPU devices before anything initialises JAX.

`python data_parallel_script.py trajectories [--l2-factor F]` prints (after
`RESULT `, as JSON) per route and optimizer the largest difference between a
`keras.distribution.DataParallel` run over the 2 devices and a single-device
run of the same global batches (weights after every epoch, and the epoch
losses), the sharding seen in both runs, and a control run with lambda
doubled. `--l2-factor F` multiplies lambda in every distributed run (to see the
comparison fail).

`python data_parallel_script.py logger` trains every route under
DataParallel with an `MlflowL2Logger` on a SQLite store in the working
directory (logging every step) and prints what the store holds, beside the
kernels read before every step, from which the expected norms and penalties
follow.
"""

import ctypes
import faulthandler
import json
import os
import signal
import sys

faulthandler.enable(all_threads=True)  # a crash in JAX's runtime then shows each thread's Python stack
# Never an orphan: dies with the test that started it (Linux), or after 330 s
# (past the test's 300 s timeout), as multiworker_script.py does.
signal.alarm(330)
if sys.platform == "linux":
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG

os.environ["KERAS_BACKEND"] = "jax"
os.environ["JAX_ENABLE_X64"] = "1"
os.environ["JAX_PLATFORMS"] = "cpu"
if "--xla_force_host_platform_device_count=2" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()

import jax  # noqa: E402

assert len(jax.devices()) == 2, jax.devices()

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from keras_l2 import select_layers  # noqa: E402
from tests.helpers import ROUTES, compile_route, data, mlp, weights  # noqa: E402

OPTIMIZERS = {"sgd": lambda: keras.optimizers.SGD(0.5), "adam": lambda: keras.optimizers.Adam(0.05)}
L2, EXAMPLES, BATCH, EPOCHS = 0.3, 32, 16, 3


class Spy(keras.callbacks.Callback):
    """Records the weights after every epoch and how every batch was placed.

    No batch-end hook: Keras keeps dispatching batch ends asynchronously, as
    without this callback (batch begins always run on the main thread). The
    step function is wrapped at train begin (Keras builds it before) to see
    each batch as it enters the step and the devices the step's outputs
    come back on.
    """

    def __init__(self, x, kernels_per_step=False):
        super().__init__()
        self.x, self.epochs, self.batches, self._step = x, [], [], 0
        self.kernels_per_step = kernels_per_step
        self.kernels = []  # with kernels_per_step: each step's kernels before it, then the final ones

    def on_train_begin(self, logs=None):
        model = self._model  # not `self.model`: on JAX that syncs the trainer's state
        step_function = model.train_function

        def spied(state, iterator):
            logs, state = step_function(state, _Tap(iterator, self._record))
            self.batches[-1]["output_devices"] = sorted(d.id for d in jax.tree.leaves(logs)[0].sharding.device_set)
            return logs, state

        model.train_function = spied

    def _record(self, batch):
        x = batch[0]
        offset = (self._step % (EXAMPLES // BATCH)) * BATCH
        self._step += 1
        shards = []
        if not isinstance(x, jax.Array):  # single device: Keras hands the step NumPy batches
            self.batches.append({"shape": list(x.shape), "spec": type(x).__name__, "shards": shards})
            return
        for shard in sorted(x.addressable_shards, key=lambda s: s.device.id):
            rows = shard.index[0]
            start, stop = rows.start or 0, BATCH if rows.stop is None else rows.stop
            rows_match = bool(np.array_equal(np.asarray(shard.data), self.x[offset + start : offset + stop]))
            shards.append({"device": shard.device.id, "rows": [start, stop], "match": rows_match})
        self.batches.append({"shape": list(x.shape), "spec": str(getattr(x.sharding, "spec", None)), "shards": shards})

    def on_train_batch_begin(self, batch, logs=None):
        # On the main thread, before the step: the weights it is about to use.
        if self.kernels_per_step:
            self.kernels.append(_kernels(self._model))

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(weights(self.model))

    def on_train_end(self, logs=None):
        if self.kernels_per_step:
            self.kernels.append(_kernels(self.model))


def _kernels(model) -> dict:
    """The Dense kernels' current values; mid-epoch on JAX they are in the trainer's state."""
    state = getattr(model, "_jax_state", None)
    live = state is not None and not getattr(model, "_jax_state_synced", True)
    index = {id(v): i for i, v in enumerate(model.trainable_variables)}
    result = {}
    for name in ("hidden", "out"):
        kernel = model.get_layer(name).kernel
        value = state["trainable_variables"][index[id(kernel)]] if live else kernel.value
        result[name] = np.array(value)
    return result


class _Tap:
    def __init__(self, iterator, record):
        self.iterator, self.record = iterator, record

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.iterator)
        self.record(batch)
        return batch


def _placement(model) -> dict:
    """How the model's, the optimizer's and the metrics' variables lie on the devices."""
    variables = list(model.variables) + list(model.optimizer.variables) + list(model.metrics_variables)
    shardings = [v.value.sharding for v in variables]
    return {
        "count": len(variables),
        "devices": sorted({d.id for s in shardings for d in s.device_set}),
        "devices_per_variable": sorted({len(s.device_set) for s in shardings}),
        "fully_replicated": all(s.is_fully_replicated for s in shardings),
        "kernel_sharding": str(model.get_layer("hidden").kernel.value.sharding),
    }


def train(route, optimizer, distribution, l2=L2, callbacks=(), kernels_per_step=False):
    keras.distribution.set_distribution(distribution)  # before any Keras object is created
    try:
        model = mlp()
        compile_route(model, route, OPTIMIZERS[optimizer](), l2, EXAMPLES, select_layers(model, names="hidden"))
        x, y = data(examples=EXAMPLES)
        spy = Spy(x, kernels_per_step)
        initial = weights(model)
        history = model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0,
                            callbacks=[*callbacks, spy]).history
        return model, spy, history, initial
    finally:
        keras.distribution.set_distribution(None)


def _max_difference(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(p) - np.asarray(q)))) for p, q in zip(a, b, strict=True))


def _compare(single, parallel) -> dict:
    (_, spy_a, history_a, _), (_, spy_b, history_b, _) = single, parallel
    assert len(spy_a.epochs) == len(spy_b.epochs) == EPOCHS
    return {
        "weights": max(_max_difference(a, b) for a, b in zip(spy_a.epochs, spy_b.epochs, strict=True)),
        "loss": _max_difference(history_a["loss"], history_b["loss"]),
    }


def trajectories(l2_factor: float) -> dict:
    distribution = keras.distribution.DataParallel(devices=jax.devices())
    result = {"differences": {}}
    for route in (*ROUTES, "none"):
        for name in OPTIMIZERS:
            single = train(route, name, None)
            parallel = train(route, name, distribution, l2=L2 * l2_factor)
            result["differences"][f"{route}-{name}"] = _compare(single, parallel)
            if (route, name) == ("coupled", "adam"):
                for label, run in (("single", single), ("parallel", parallel)):
                    model, spy, _, initial = run
                    result[label] = {"variables": _placement(model), "batches": spy.batches,
                                     "moved": _max_difference(initial, spy.epochs[-1])}
                # The control: lambda doubled on the distributed side must show.
                result["control"] = _compare(single, train(route, name, distribution, l2=2 * L2))
    return result


def logger_check() -> dict:
    import mlflow

    from keras_l2 import MlflowL2Logger

    uri = f"sqlite:///{os.path.abspath('store.db')}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    client.search_experiments()  # creates the store's tables now, not inside the logger's delivery window
    distribution = keras.distribution.DataParallel(devices=jax.devices())
    result = {}
    for route in ROUTES:
        logger = MlflowL2Logger(tracking_uri=uri, log_every_n_steps=1, verbose=0)
        model, spy, history, _ = train(route, "adam", distribution, callbacks=[logger], kernels_per_step=True)
        delivered = logger.flush(timeout=60)
        run = client.get_run(logger.run_id)

        def logged(key, run_id=run.info.run_id):
            return [[m.step, m.value] for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]

        kernels = [model.get_layer(name).kernel for name in ("hidden", "out")]
        result[route] = {
            "delivered": delivered,
            "status": run.info.status,
            "kernel_devices": [len(k.value.sharding.device_set) for k in kernels],
            # Norms after step 0 (initial), 1, ..., 6; the last are the final kernels'.
            "norms": {name: [float(np.linalg.norm(k[name])) for k in spy.kernels] for name in ("hidden", "out")},
            "final_norms": [float(np.linalg.norm(keras.ops.convert_to_numpy(k))) for k in kernels],
            # What the step before it used: l2 / n * ||W_hidden||^2 (only "hidden" is chosen).
            "step_penalties": [L2 / EXAMPLES * float(np.sum(k["hidden"] ** 2)) for k in spy.kernels[:-1]],
            "weight_norm": {name: logged(f"weight_norm/{name}") for name in ("hidden", "out")},
            "step_weight_norm": {name: logged(f"step/weight_norm/{name}") for name in ("hidden", "out")},
            "l2_penalty": logged("l2_penalty"),
            "step_l2_penalty": logged("step/l2_penalty"),
            "history_l2_penalty": history["l2_penalty"],
        }
    return result


if __name__ == "__main__":
    keras.config.set_floatx("float64")
    if sys.argv[1] == "trajectories":
        factor = float(sys.argv[sys.argv.index("--l2-factor") + 1]) if "--l2-factor" in sys.argv else 1.0
        output = trajectories(factor)
    elif sys.argv[1] == "logger":
        output = logger_check()
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
    print("RESULT " + json.dumps(output), flush=True)
