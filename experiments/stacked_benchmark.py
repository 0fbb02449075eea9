"""Stacked against sequential sweeps: wall time of whole `run_sweep` calls, in interleaved rounds.

Each round runs the same sweep twice in this process, stacked (every lambda
of a seed in one compiled model) and one run after another, in alternating
order, each into its own fresh SQLite store; the table gives the medians and
the median of the per-round ratios stacked / sequential. Cases:

- `digits`: the default sweep (`keras-l2 sweep`: 7 lambdas, 60 epochs,
  64-512-512-10, batch 32, 200 training examples);
- `wide`: 784-1024-1024-10 at batch 256 on 2,048 random examples (4 lambdas,
  2 epochs): compute-bound on a CPU, so expected near 1 there.

Usage: `python experiments/stacked_benchmark.py [--rounds 3] [--cases digits,wide] [--phases]`
(`KERAS_BACKEND` picks the backend; TensorFlow by default).

`--phases` also says where each sweep's time went (each row a median over
rounds, so the rows need not add up): inside `fit`, the compiled train steps
(their first call traces; the step fetches its batch itself), the validation
at each epoch end, the loggers (`MlflowL2Logger`'s start, epoch ends and end,
where it waits for delivery), and the rest of Keras' loop (creating the data
iterators, the other callbacks); outside `fit`, building the models, MLflow's
parent run, the test split's loss and the plots; and, across all of it, Python's
garbage collections. The split is meaningful where a step returns when its work
is done (TensorFlow on a CPU); JAX and GPUs return before, and the work lands
in whatever waits for it next.

`--fit-only` times `fit` alone, without MLflow (what `experiments/gpu_check.sh`
runs on a GPU machine, which has no MLflow): K = 8 members of
784-1024-1024-10 at batch 256 on 8,192 random examples, 4 epochs (`--epochs`),
stacked against 8 separate fits. It reports building and fitting together, then
apart: building (models, routes, `compile`), the whole fit, its first epoch (where
compilation happens) and the later epochs (the steady per-step cost): a short
fit on a GPU is mostly building and compilation.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_l2.search.models import mlp_function  # noqa: E402

# What --fit-only reports: building and fitting, building, the whole fit, its first epoch (compilation
# in it), and the later epochs.
PARTS = ("build + fit", "build", "whole fit", "first epoch", "later epochs")


def wide_case():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2048 + 512, 784)).astype("float32")
    y = (x @ rng.normal(size=(784, 10))).argmax(axis=1)
    data = (x[:2048], y[:2048], x[2048:], y[2048:])
    config = dict(lambdas=(0.0, 0.01, 0.1, 1.0), epochs=2, batch_size=256, layers=None)
    return config, mlp_function(784, 10, (1024, 1024)), data


CASES = {
    "digits": lambda: ({}, None, None),
    "wide": wide_case,
}


PHASES = ("whole sweep", "fit", "train steps", "validation", "loggers", "rest of fit", "outside fit",
          "garbage collections")


@contextlib.contextmanager
def phases(into: collections.Counter):
    """Adds the seconds spent in each of `PHASES` while the block runs to `into` (by wrapping Keras' methods)."""
    from keras_l2 import MlflowL2Logger

    wrapped, active = [], [True]  # (a model made in the block keeps its timed step: it stops counting after)

    def timing(function, phase):
        def timed_call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                if active[0]:
                    into[phase] += time.perf_counter() - start

        timed_call.timed = True
        return timed_call

    def replace(owner, name, replacement):
        wrapped.append((owner, name, owner.__dict__.get(name)))
        setattr(owner, name, replacement)

    def make_train_function(self, force=False):
        made = original_make(self, force)
        if self.train_function is not None and not getattr(self.train_function, "timed", False):
            self.train_function = timing(self.train_function, "train steps")
        return made

    collecting = []

    def on_collection(phase, info):
        if phase == "start":
            collecting.append(time.perf_counter())
        elif collecting:
            into["garbage collections"] += time.perf_counter() - collecting.pop()

    original_make = keras.Model.make_train_function
    replace(keras.Model, "make_train_function", make_train_function)
    replace(keras.Model, "fit", timing(keras.Model.fit, "fit"))
    replace(keras.Model, "evaluate", timing(keras.Model.evaluate, "validation"))
    for hook in ("on_train_begin", "on_epoch_end", "on_train_end"):
        replace(MlflowL2Logger, hook, timing(getattr(MlflowL2Logger, hook), "loggers"))
    gc.callbacks.append(on_collection)
    try:
        yield
    finally:
        active[0] = False
        gc.callbacks.remove(on_collection)
        for owner, name, own in reversed(wrapped):
            if own is None:
                delattr(owner, name)
            else:
                setattr(owner, name, own)


def timed(case: str, stacked: bool, root: str, into: collections.Counter | None = None) -> float:
    from keras_l2.search import SweepConfig, run_sweep  # (MLflow: not on the GPU machine)

    overrides, model, data = CASES[case]()
    store = tempfile.mkdtemp(dir=root)
    config = SweepConfig(stacked=stacked, verbose=0, tracking_uri=f"sqlite:///{store}/mlflow.db",
                         results_dir=os.path.join(store, "plots"), spool_dir=os.path.join(store, "spool"),
                         **overrides)
    counts = collections.Counter()
    with phases(counts) if into is not None else contextlib.nullcontext():
        start = time.perf_counter()
        run_sweep(config, model=model, data=data)
        seconds = time.perf_counter() - start
    if into is not None:
        # Validation runs inside fit, the train steps and the loggers too: "rest of fit" is what is left.
        counts["whole sweep"] = seconds
        counts["rest of fit"] = counts["fit"] - counts["train steps"] - counts["validation"] - counts["loggers"]
        counts["outside fit"] = seconds - counts["fit"]
        into.update(counts)
    return seconds


def fit_only(members: int = 8, epochs: int = 4, examples: int = 8192, stacked_first: bool = False) -> dict:
    """`members` separate fits against one stacked fit of them (no tracking), split by epoch.

    Returns, for "sequential" (summed over the members) and "stacked", a tuple of seconds in the
    order of `PARTS`: building and fitting, building (the models, routes and `compile`; for the
    stack `stack_models`), the whole `fit` call, its first epoch (the compilation is in it) and the
    later epochs (the steady per-step cost; 0 when `epochs` is 1).
    """
    from keras_l2.routes import apply_route, make_optimizer
    from keras_l2.search.models import build_run, choose_layers
    from keras_l2.search.stacking import stack_models
    from keras_l2.search.training import EpochClock

    rng = np.random.default_rng(0)
    x = rng.normal(size=(examples, 784)).astype("float32")
    y = np.eye(10, dtype="float32")[(x @ rng.normal(size=(784, 10))).argmax(axis=1)]
    build = mlp_function(784, 10, (1024, 1024))
    lambdas = [0.0] + [10.0 ** k for k in range(-3, members - 4)]

    def build_and_fit(make) -> tuple:
        start = time.perf_counter()
        model = make()
        built = time.perf_counter()
        clock = EpochClock()
        model.fit(x, y, batch_size=256, epochs=epochs, verbose=0, callbacks=[clock])
        end = time.perf_counter()
        return end - start, built - start, end - built, clock.seconds[0], sum(clock.seconds[1:])

    def one(l2):
        model = build_run(build, 0)  # as a sweep's run builds it
        optimizer, loss = apply_route(model, "regularizer", make_optimizer("adam", 1e-3), l2, examples,
                                      choose_layers(model, None))
        model.compile(optimizer=optimizer, loss=loss)
        return model

    def stack():
        return stack_models(build, lambdas, 0, route="regularizer", n=examples, metrics=())

    # Whichever side goes first compiles what both use (JAX's caches are global): alternate.
    if stacked_first:
        stacked = build_and_fit(stack)
    sequential = [build_and_fit(lambda l2=l2: one(l2)) for l2 in lambdas]
    if not stacked_first:
        stacked = build_and_fit(stack)
    return {"sequential": tuple(sum(parts) for parts in zip(*sequential, strict=True)), "stacked": stacked}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", default="digits,wide")
    parser.add_argument("--fit-only", action="store_true", help="time fit alone, K=8 wide members, no MLflow")
    parser.add_argument("--epochs", type=int, default=4, help="with --fit-only: epochs per fit (>= 2)")
    parser.add_argument("--phases", action="store_true", help="also say where each sweep's time went")
    args = parser.parse_args(argv)
    if args.rounds < 1 or (args.fit_only and args.epochs < 2):
        parser.error(f"--rounds must be >= 1 and --epochs >= 2; received {args.rounds} and {args.epochs}")
    if args.fit_only:
        print(f"backend {keras.backend.backend()}, fit only, 8 members of 784-1024-1024-10, batch 256, "
              f"{args.epochs} epochs of 32 steps (sequential: summed over the 8 fits)", flush=True)
        print("| round | part | sequential (s) | stacked (s) | stacked / sequential |\n|---|---|---|---|---|")
        ratios = {part: [] for part in PARTS}
        for round_ in range(args.rounds):
            times = fit_only(epochs=args.epochs, stacked_first=round_ % 2 == 1)
            for index, part in enumerate(PARTS):
                sequential, stacked = times["sequential"][index], times["stacked"][index]
                if sequential > 0:
                    ratios[part].append(stacked / sequential)
                    print(f"| {round_ + 1} | {part} | {sequential:.2f} | {stacked:.2f} | {ratios[part][-1]:.3f} |",
                          flush=True)
        for part, values in ratios.items():
            if values:
                print(f"| median of {len(values)} | {part} | | | {statistics.median(values):.3f} |")
        print("(target for build + fit: <= 0.25)")
        return
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"--cases: unknown {unknown}; choose from {sorted(CASES)}")
    print(f"backend {keras.backend.backend()}, {os.cpu_count()} CPUs, {args.rounds} interleaved rounds", flush=True)
    rows, spent = [], {}
    with tempfile.TemporaryDirectory() as root:
        for case in cases:
            times = {True: [], False: []}
            for round_ in range(args.rounds):
                for stacked in ((True, False) if round_ % 2 == 0 else (False, True)):
                    counts = collections.Counter() if args.phases else None
                    times[stacked].append(timed(case, stacked, root, counts))
                    if counts is not None:
                        spent.setdefault((case, stacked), []).append(counts)
                print(f"  {case} round {round_ + 1}: stacked {times[True][-1]:.1f} s, "
                      f"sequential {times[False][-1]:.1f} s", flush=True)
            ratios = [s / q for s, q in zip(times[True], times[False], strict=True)]
            rows.append((case, statistics.median(times[False]), statistics.median(times[True]),
                         statistics.median(ratios), min(ratios), max(ratios)))
    print("\n| case | sequential (s) | stacked (s) | stacked / sequential (median) | range |")
    print("|---|---|---|---|---|")
    for case, sequential, stacked, ratio, low, high in rows:
        print(f"| {case} | {sequential:.1f} | {stacked:.1f} | {ratio:.3f} | {low:.3f}–{high:.3f} |")
    for case in cases if args.phases else ():
        print(f"\nWhere the {case} sweeps' time went (s, median over rounds):\n")
        print("| phase | sequential | stacked |\n|---|---|---|")
        for phase in PHASES:
            sequential, stacked = (statistics.median(c[phase] for c in spent[(case, s)]) for s in (False, True))
            print(f"| {phase} | {sequential:.1f} | {stacked:.1f} |")


if __name__ == "__main__":
    main()
