"""Per-step training time of every keras_l2 route, with and without the logger.

One question: what does each route cost per training step, next to no
regularization and next to Keras' own `L2` regularizer and `weight_decay`?

Every variant trains its own copy of the same network with SGD (a route and
the same route with `MlflowL2Logger` share one model, so the logger is the
only difference between them). Variants are interleaved in one process: each
round fits every variant once, in alternating order, for a few epochs, and
times each epoch from its first callback to its last (so a logger's epoch-end
work is inside the time). The first epoch of a fit holds the once-per-fit
costs (a new MLflow run, a retrace) and is not counted. The table reports, per
variant, the median over rounds of its ms/step and of its ratio to "none" in
the same round. "none (A/A)" is the baseline timed twice: its distance from
1.000 is this run's noise.

    python experiments/benchmark.py                      # digits and 784-1024-1024-10, jit on and off
    python experiments/benchmark.py --quick              # under 2 minutes here (1 min 50 s measured)
    KERAS_BACKEND=jax python experiments/benchmark.py --models mlp4096 --jit on   # a GPU
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass

import keras
import numpy as np

import keras_l2
from keras_l2.routes import ROUTES, apply_route
from keras_l2.search import all_digits, build_model

L2 = 1e-2
LEARNING_RATE = 0.01
BASELINE = "none"
VARIANTS = (
    BASELINE, f"{BASELINE} (A/A)", "keras_L2", "keras_weight_decay", *ROUTES, *(f"{r}+logger" for r in ROUTES),
)
TARGET = 1.03  # issue 5: every keras_l2 route and mode, ratio to no regularization


@dataclass(frozen=True)
class Workload:
    hidden: tuple
    batch: int
    steps: int  # per epoch, at full size
    data: str  # "digits" or "synthetic"


MODELS = {
    # The sweep's network (64-512-512-10) on all 1797 digits, its batch size.
    "digits": Workload((512, 512), 32, 56, "digits"),
    "mlp1024": Workload((1024, 1024), 256, 24, "synthetic"),
    "mlp4096": Workload((4096, 4096), 1024, 24, "synthetic"),
}


def dataset(workload: Workload, steps: int):
    examples = workload.batch * steps
    if workload.data == "digits":
        x, y = all_digits()
        repeats = -(-examples // len(x))
        return np.tile(x, (repeats, 1))[:examples], np.tile(y, (repeats, 1))[:examples]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(examples, 784)).astype("float32")
    return x, np.eye(10, dtype="float32")[rng.integers(0, 10, examples)]


def build(variant: str, workload: Workload, inputs: int, jit: bool, n: int):
    """One model, compiled for `variant` (a "+logger" variant reuses its route's model)."""
    model = build_model(inputs, 10, workload.hidden, seed=0)
    dense = keras_l2.select_layers(model)
    optimizer = keras.optimizers.SGD(LEARNING_RATE)
    loss = "categorical_crossentropy"
    if variant == "keras_L2":
        for layer in dense:  # Keras 3 keeps the regularizer on the variable
            layer.kernel.regularizer = keras.regularizers.L2(L2 / n)
    elif variant == "keras_weight_decay":
        optimizer = keras.optimizers.SGD(LEARNING_RATE, weight_decay=2 * L2 / n)
        optimizer.exclude_from_weight_decay(var_names=["bias"])
    elif variant in ROUTES:
        optimizer, loss = apply_route(model, variant, optimizer, L2, n, dense)
    model.compile(optimizer=optimizer, loss=loss, jit_compile=jit)
    return model


class _EpochStart(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()


class _EpochEnd(keras.callbacks.Callback):
    def __init__(self, start: _EpochStart):
        super().__init__()
        self.start, self.seconds = start, []

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start.started)


def seconds_per_step(model, x, y, batch: int, epochs: int, logger_store: str | None) -> float:
    """Median over epochs 2.. of one fit, per step; the first epoch holds once-per-fit costs."""
    start = _EpochStart()
    end = _EpochEnd(start)
    middle = [keras_l2.MlflowL2Logger(tracking_uri=logger_store, verbose=0)] if logger_store else []
    model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0, callbacks=[start, *middle, end])
    return statistics.median(end.seconds[1:]) / (len(x) // batch)


def run(workload: Workload, variants, jit: bool, rounds: int, steps: int, epochs: int, store: str):
    x, y = dataset(workload, steps)
    models = {}
    for variant in variants:
        route = variant.removesuffix("+logger").removesuffix(" (A/A)")
        if route not in models:
            models[route] = build(route, workload, x.shape[1], jit, n=len(x))
        models[variant] = models[route]
    stores = {v: (store if v.endswith("+logger") else None) for v in variants}
    for variant in variants:  # trace (both step functions of a shared model) outside the timed rounds
        seconds_per_step(models[variant], x[: 2 * workload.batch], y[: 2 * workload.batch], workload.batch, 2,
                         stores[variant])
    times: dict[str, list[float]] = {v: [] for v in variants}
    ratios: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        this_round = {v: seconds_per_step(models[v], x, y, workload.batch, epochs, stores[v]) for v in order}
        for v in variants:
            times[v].append(this_round[v])
            ratios[v].append(this_round[v] / this_round[BASELINE])
    return {v: (statistics.median(times[v]), statistics.median(ratios[v])) for v in variants}


def verdict(variant: str, ratio: float) -> str:
    if variant.split("+")[0] not in ROUTES:
        return ""
    return "met" if ratio <= TARGET else "MISSED"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="3 rounds of 8 steps (1 min 50 s here): a smoke run, too noisy for 1%% claims")
    parser.add_argument("--models", default="digits,mlp1024",
                        help=f"comma-separated, from {', '.join(MODELS)} (mlp4096 is 784-4096-4096-10, batch 1024)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 12; quick 3)")
    parser.add_argument("--steps", type=int, default=None, help="steps per epoch (default: per model; quick 8)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per fit, the first not counted (>= 2)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--jit", choices=["on", "off", "both"], default="both")
    parser.add_argument("--threads", type=int, default=1,
                        help="TensorFlow CPU threads (0: TensorFlow's default). One thread is the default "
                             "because on a shared 2-core machine two threads flip between two speeds "
                             "(seen here), which drowns a 1%% effect.")
    args = parser.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    unknown = sorted(set(names) - set(MODELS))
    if unknown or not names:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.epochs < 2:
        parser.error(f"--epochs must be >= 2 (the first epoch is not timed). Received: {args.epochs}")
    for name, value in (("rounds", args.rounds), ("steps", args.steps)):
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1. Received: {value}")
    variants = [BASELINE] + [v for v in VARIANTS if v in variants and v != BASELINE]  # fixed order
    if any(v.endswith("+logger") for v in variants):
        try:
            import mlflow  # noqa: F401
        except ImportError:
            parser.error("the +logger variants need mlflow; leave them out of --variants")
    backend = keras.backend.backend()
    if args.threads and backend == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 12)
    jits = {"on": [True], "off": [False], "both": [True, False]}[args.jit]
    print(f"backend={backend} rounds={rounds} epochs/fit={args.epochs} (first not timed) "
          f"threads={args.threads or 'default'} l2={L2} optimizer=SGD({LEARNING_RATE})", flush=True)
    header = f"{'model':<9}{'jit':<5}{'variant':<22}{'ms/step':>10}{'ratio':>8}  target<={TARGET}"
    print(header, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        store = f"sqlite:///{tmp}/mlflow.db"
        for name in names:
            workload = MODELS[name]
            steps = args.steps or (8 if args.quick else workload.steps)
            for jit in jits:
                table = run(workload, variants, jit, rounds, steps, args.epochs, store)
                for variant, (seconds, ratio) in table.items():
                    print(f"{name:<9}{'on' if jit else 'off':<5}{variant:<22}{seconds * 1e3:>10.3f}"
                          f"{ratio:>8.3f}  {verdict(variant, ratio)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
