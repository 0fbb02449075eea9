"""What MlflowL2Logger costs a training run, against the same training without it.

Each round trains every variant (no logger, logging per epoch, logging every
10 steps) for a few epochs, interleaved, on a real SQLite store in a temporary
directory. The time of an epoch is measured from one epoch end to the next, so
it includes the logger's epoch-end work, its in-graph metrics and the
background delivery thread. The first two epochs are not counted: they hold
the once-per-fit costs (tracing; creating the run and logging its params,
about 50 ms of store work). The table reports medians
over rounds of each variant's ratio to no logger in the same round, for wall
time and for the training process's CPU time (all its threads), and the time
`on_train_end` waits for the last records to reach the store, and the
logger's own work per epoch: its hooks on the training thread and the CPU time
of delivery (the delivery process's store calls, which a spare core hides from
the wall clock, and the training process's hand-off to it). "no logger (A/A)" is the
baseline timed twice: its distance from 1.000
is the measurement noise of the run.

    python experiments/logger_overhead.py            # digits MLP and 784-1024-1024-10
    python experiments/logger_overhead.py --quick    # fewer rounds
    python experiments/logger_overhead.py --models 784-1024-1024-10 --metrics-only   # what the metrics alone cost
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

import keras_l2
from keras_l2.routes import apply_route
from keras_l2.search import all_digits, build_model

MODELS = {
    # name: (layer widths, batch size, examples, epochs per fit)
    "digits": ((64, 256, 256, 10), 32, 1797, 12),
    "784-1024-1024-10": ((784, 1024, 1024, 10), 256, 3072, 7),
}
VARIANTS = {"no logger": None, "no logger (A/A)": None, "per epoch": 0, "every 10 steps": 10}
EVERY_STEP = {"every step": 1}  # with --every-step
METRICS_ONLY = {"metrics only": "metrics"}  # with --metrics-only: the logger's in-step metrics, no logger, no MLflow


class EpochClock(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.ends = []

    def on_epoch_end(self, epoch, logs=None):
        self.ends.append((time.perf_counter(), time.process_time()))


class TimedLogger(keras_l2.MlflowL2Logger):
    """Times the logger's own work: its epoch and step hooks, and its final wait."""

    hook_seconds = 0.0

    def on_epoch_end(self, epoch, logs=None):
        start = time.perf_counter()
        super().on_epoch_end(epoch, logs)
        self.hook_seconds += time.perf_counter() - start

    def _on_step_end(self, batch, logs=None):
        start = time.perf_counter()
        super()._on_step_end(batch, logs)
        self.hook_seconds += time.perf_counter() - start

    def on_train_end(self, logs=None):
        start = time.perf_counter()
        super().on_train_end(logs)
        self.end_seconds = time.perf_counter() - start


def data(name: str):
    sizes, _, examples, _ = MODELS[name]
    if name == "digits":
        return all_digits()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(examples, sizes[0])).astype("float32")
    return x, np.eye(sizes[-1], dtype="float32")[rng.integers(0, sizes[-1], examples)]


def build(sizes, route: str, n: int):
    model = build_model(sizes[0], sizes[-1], tuple(sizes[1:-1]), seed=0)
    optimizer, loss = apply_route(model, route, keras.optimizers.Adam(1e-3), 1e-3, n, keras_l2.select_layers(model))
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
    return model


def fit(model, x, y, batch, epochs, every, store_uri):
    clock = EpochClock()
    callbacks = []
    logger = None
    if every == "metrics":
        keras_l2.attach_l2_metrics(model)
    elif every is not None:
        logger = TimedLogger(tracking_uri=store_uri, log_every_n_steps=every or None, verbose=0)
        callbacks.append(logger)
    model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0, callbacks=[*callbacks, clock])
    if every == "metrics":
        keras_l2.detach_l2_metrics(model)
    wall, cpu = np.median(np.diff(np.array(clock.ends), axis=0)[1:], axis=0)  # epochs 3..
    if logger is None:
        return wall, cpu, 0.0, 0.0, 0.0
    # The logger's own work per epoch: its hooks on the training thread, and the
    # delivery thread's CPU in store calls (run set-up included).
    return wall, cpu, logger.end_seconds, logger.hook_seconds / epochs, logger._outbox.cpu_seconds / epochs


def run(name: str, route: str, rounds: int, store_uri: str, variants: dict):
    sizes, batch, _, epochs = MODELS[name]
    x, y = data(name)
    # One model for every variant, so that the only difference is the logger
    # (separate models drift apart in speed over rounds, as memory and
    # denormals do). The logger's metrics attach and detach per fit; on
    # TensorFlow both traced versions of the step are kept, so neither retraces.
    model = build(sizes, route, len(x))
    models = {v: model for v in variants}
    for variant, every in variants.items():  # warm-up: trace, create the store
        fit(models[variant], x[: 2 * batch], y[: 2 * batch], batch, 3, every, store_uri)
    rows = {v: [] for v in variants}  # per round: (wall s, wall ratio, cpu ratio, end wait s, hooks s, delivery s)
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        timed = {v: fit(models[v], x, y, batch, epochs, variants[v], store_uri) for v in order}
        wall0, cpu0 = timed["no logger"][:2]
        for variant, (wall, cpu, end, hooks, delivery) in timed.items():
            rows[variant].append((wall, wall / wall0, cpu / cpu0, end, hooks, delivery))
    steps = -(-len(x) // batch)
    return {v: (*(statistics.median(column) for column in zip(*rows[v], strict=True)), steps) for v in variants}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--route", default="regularizer", choices=["regularizer", "loss", "coupled", "decoupled"])
    parser.add_argument("--threads", type=int, default=1,
                        help="TensorFlow CPU threads (0: TensorFlow's default); see benchmark.py")
    parser.add_argument("--every-step", action="store_true", help="also time logging at every step")
    parser.add_argument("--metrics-only", action="store_true",
                        help="also time the logger's in-step metrics alone (attached, no logger, no MLflow)")
    args = parser.parse_args()
    variants = {**VARIANTS, **(EVERY_STEP if args.every_step else {}), **(METRICS_ONLY if args.metrics_only else {})}
    names = [m for m in args.models.split(",") if m]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    if args.threads and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    rounds = args.rounds or (3 if args.quick else 9)
    print(f"backend={keras.backend.backend()} route={args.route} rounds={rounds} "
          f"threads={args.threads or 'default'} store=SQLite (temporary)")
    print(f"{'model':<18}{'logging':<17}{'steps/epoch':>12}{'ms/epoch':>10}{'wall ratio':>11}{'cpu ratio':>10}"
          f"{'train-end wait ms':>19}{'hooks ms/epoch':>16}{'delivery cpu ms/epoch':>23}")
    with tempfile.TemporaryDirectory() as root:
        store_uri = f"sqlite:///{Path(root) / 'mlflow.db'}"
        for name in names:
            for variant, (wall, ratio, cpu, end, hooks, delivery, steps) in run(
                    name, args.route, rounds, store_uri, variants).items():
                print(f"{name:<18}{variant:<17}{steps:>12}{wall * 1e3:>10.1f}{ratio:>11.3f}{cpu:>10.3f}"
                      f"{end * 1e3:>19.1f}{hooks * 1e3:>16.2f}{delivery * 1e3:>23.2f}")


if __name__ == "__main__":
    main()
