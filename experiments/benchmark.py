"""Per-step training time of every keras_l2 route against no regularization.

One question: what does each route cost per training step, next to Keras' own
`L2` regularizer and `weight_decay`? Variants are interleaved in one process
(timing on 2 CPU cores swings 30-50% between runs), each round times every
variant once, and the table reports the median over rounds of each variant's
ratio to the no-regularization time of the same round.

    python experiments/benchmark.py            # 784-1024-1024-10, batch 256, jit on and off
    python experiments/benchmark.py --quick    # fewer rounds and steps
"""

from __future__ import annotations

import argparse
import statistics
import time

import keras
import numpy as np

import keras_l2
from keras_l2.sweep import ROUTES, apply_route

VARIANTS = ("none", "keras_L2", "keras_weight_decay", "regularizer", "loss", "coupled", "decoupled")
L2 = 1e-4


def build(variant: str, sizes: tuple[int, ...], jit: bool, n: int):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((sizes[0],))]
    for width in sizes[1:-1]:
        reg = keras.regularizers.L2(L2) if variant == "keras_L2" else None
        layers.append(keras.layers.Dense(width, activation="relu", kernel_regularizer=reg))
    reg = keras.regularizers.L2(L2) if variant == "keras_L2" else None
    layers.append(keras.layers.Dense(sizes[-1], activation="softmax", kernel_regularizer=reg))
    model = keras.Sequential(layers)
    chosen = keras_l2.select_layers(model)
    optimizer = keras.optimizers.SGD(0.01)
    loss = "categorical_crossentropy"
    if variant == "keras_weight_decay":
        optimizer = keras.optimizers.SGD(0.01, weight_decay=2 * L2 / n)
        optimizer.exclude_from_weight_decay(var_names=["bias"])
    elif variant in ROUTES:
        optimizer, loss = apply_route(model, variant, optimizer, L2, n, chosen)
    model.compile(optimizer=optimizer, loss=loss, jit_compile=jit)
    return model


def seconds_per_step(model, x, y, batch: int) -> float:
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    return (time.perf_counter() - start) / (len(x) // batch)


def run(sizes, batch, steps, rounds, jit, variants=VARIANTS) -> dict[str, tuple[float, float]]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * steps, sizes[0])).astype("float32")
    y = np.eye(sizes[-1], dtype="float32")[rng.integers(0, sizes[-1], len(x))]
    variants = ("none",) + tuple(v for v in variants if v != "none")
    models = {v: build(v, sizes, jit, n=len(x)) for v in variants}
    for model in models.values():  # trace and warm up outside the timed rounds
        seconds_per_step(model, x[: 2 * batch], y[: 2 * batch], batch)
    ratios: dict[str, list[float]] = {v: [] for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        this_round = {v: seconds_per_step(models[v], x, y, batch) for v in order}
        for v in variants:
            times[v].append(this_round[v])
            ratios[v].append(this_round[v] / this_round["none"])
    return {v: (statistics.median(times[v]), statistics.median(ratios[v])) for v in variants}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps (about a minute)")
    parser.add_argument("--sizes", default="784,1024,1024,10", help="layer widths, input first")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--jit", choices=["on", "off", "both"], default="both")
    parser.add_argument("--threads", type=int, default=1,
                        help="TensorFlow CPU threads (0: TensorFlow's default). One thread is the default "
                             "because on a shared 2-core machine two threads flip between two speeds "
                             "(seen here), which drowns a 1%% effect.")
    args = parser.parse_args()
    if args.threads and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    sizes = tuple(int(s) for s in args.sizes.split(","))
    rounds = args.rounds or (8 if args.quick else 16)
    steps = args.steps or (15 if args.quick else 30)
    jits = {"on": [True], "off": [False], "both": [True, False]}[args.jit]
    print(f"backend={keras.backend.backend()} sizes={sizes} batch={args.batch} "
          f"steps/round={steps} rounds={rounds} threads={args.threads or 'default'}")
    print(f"{'jit':<5}{'variant':<22}{'ms/step':>10}{'ratio':>9}")
    for jit in jits:
        variants = tuple(v for v in args.variants.split(",") if v)
        unknown = sorted(set(variants) - set(VARIANTS))
        if unknown:
            parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
        for variant, (seconds, ratio) in run(sizes, args.batch, steps, rounds, jit, variants).items():
            print(f"{'on' if jit else 'off':<5}{variant:<22}{seconds * 1e3:>10.2f}{ratio:>9.3f}")


if __name__ == "__main__":
    main()
