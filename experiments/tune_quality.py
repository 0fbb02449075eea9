"""Does `keras-l2 tune` find a lambda as good as a fine grid's best, at <= 3x the cost of one run?

For each data set (the digits, scikit-learn's wine) and seed: the tune with
its defaults, run as a user runs it (`keras-l2 tune --json`, a fresh process,
so that its cost is not measured in a process that has trained every grid
before), and a 14-point grid (0 and the half decades 1e-4 ... 1e2) trained
with the same model, route, optimizer, epochs and seed (one stack, here).
Prints one row per case: the tune's best lambda and validation data loss,
the grid's, their ratio (target <= 1.02 in >= 5 of 6 cases) and
cost_in_runs (target <= 3.0 in every case).

    python experiments/tune_quality.py [--datasets digits,wine] [--seeds 0,1,2] [--epochs 60]
    python experiments/tune_quality.py --study [--repeats 3]

With `--study` it checks the shared tune instead (`keras-l2 tune --study`,
Optuna's TPE, 8 trials by default, one worker on SQLite): per data set,
seed 0 (a shared tune trains every λ with it), `--repeats` studies that
differ only in TPE's draws, against the same grid. Its cost is the epochs
all trials trained (pruned ones stop early), in runs: what the workers
share between them.

With `--greedy` it shows instead why the tune holds λ for the first half:
λ following the one-step hypergradient from the first epoch on (a move of
0.15 in log λ every epoch, against its sign), printed every 10 epochs, from
three starting λs, on the digits' coupled route (no MLflow).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

GRID = (0.0, *(float(f"{10 ** (k / 2):.6g}") for k in range(-8, 5)))  # 0, 1e-4, 3.16e-4, ..., 1e2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="digits,wine")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--greedy", action="store_true", help="the greedy one-step schedule from the first epoch")
    p.add_argument("--study", action="store_true", help="the shared tune (TPE) against the grid, seed 0")
    p.add_argument("--repeats", type=int, default=3, help="with --study: studies per data set")
    args = p.parse_args(argv)
    if args.greedy:
        return greedy(args.epochs)
    if args.study:
        return shared(args.datasets.split(","), args.repeats, args.epochs)

    rows = []
    with tempfile.TemporaryDirectory() as root:
        for dataset in args.datasets.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                tune = tune_in_a_new_process(dataset, seed, args.epochs, root)
                grid_l2, grid_loss = grid_best(dataset, seed, args.epochs, root)
                rows.append((dataset, seed, tune["best_lambda"], tune["best_val_data_loss"], grid_l2, grid_loss,
                             tune["best_val_data_loss"] / grid_loss, tune["cost_in_runs"]))
                print(f"{dataset} seed {seed}: tune {tune['best_lambda']:.4g} ({tune['best_val_data_loss']:.4f}; "
                      f"confirmation {tune['confirmation']}), grid {grid_l2:g} ({grid_loss:.4f}), ratio "
                      f"{rows[-1][6]:.4f}, cost_in_runs {tune['cost_in_runs']:.2f}", file=sys.stderr, flush=True)
    print("| data | seed | tune's lambda | tune's val data loss | grid's best lambda | grid's val data loss | ratio "
          "| cost_in_runs |")
    print("|---|---|---|---|---|---|---|---|")
    for dataset, seed, lam, loss, grid_lam, grid_loss, ratio, cost in rows:
        print(f"| {dataset} | {seed} | {lam:.4g} | {loss:.4f} | {grid_lam:g} | {grid_loss:.4f} | {ratio:.3f} "
              f"| {cost:.2f} |")
    good = sum(ratio <= 1.02 for *_, ratio, _ in rows)
    print(f"\nratio <= 1.02 in {good} of {len(rows)} cases (target: all but one); cost_in_runs <= 3.0 in "
          f"{sum(cost <= 3.0 for *_, cost in rows)} of {len(rows)} (target: all)")
    return 0


def grid_best(dataset: str, seed: int, epochs: int, root: str) -> tuple:
    """(lambda, val data loss) of the 14-point grid's best run, trained as one stack."""
    from keras_l2.search.training import RunPlan, train_stack
    from keras_l2.search.tuning import TuneConfig, prepare_tune

    config = TuneConfig(dataset=dataset, seed=seed, epochs=epochs, verbose=0,
                        tracking_uri=f"sqlite:///{root}/mlflow.db", spool_dir=f"{root}/spool")
    sweep = prepare_tune(config).sweep  # the same checked data, model and store as the tune's
    plan = RunPlan(sweep.config, sweep.data, sweep.build, None, sweep.store.tracking_uri)
    best = min(train_stack(plan, GRID, seed), key=lambda r: r["history"]["val_data_loss"][-1])
    return best["l2"], best["history"]["val_data_loss"][-1]


def shared(datasets: list, repeats: int, epochs: int) -> int:
    """The shared tune's table: per data set and repeat, its answer against the grid's, and its cost in runs."""
    import optuna

    rows = []
    with tempfile.TemporaryDirectory() as root:
        storage = f"sqlite:///{root}/optuna.db"
        for dataset in datasets:
            grid_l2, grid_loss = grid_best(dataset, 0, epochs, root)
            for repeat in range(repeats):
                tune = tune_in_a_new_process(dataset, 0, epochs, root, "--study", f"{dataset}-{repeat}",
                                             "--storage", storage)
                trials = optuna.load_study(study_name=f"{dataset}-{repeat}", storage=storage).trials
                pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in trials)
                runs = sum(len(t.intermediate_values) for t in trials) / epochs
                rows.append((dataset, repeat, tune["best_lambda"], tune["best_val_data_loss"], grid_l2, grid_loss,
                             tune["best_val_data_loss"] / grid_loss, len(trials), pruned, runs))
                print(f"{dataset} repeat {repeat}: {rows[-1]}", file=sys.stderr, flush=True)
    print("| data | repeat | tune's lambda | tune's val data loss | grid's best lambda | grid's val data loss | ratio "
          "| trials | pruned | epochs trained, in runs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dataset, repeat, lam, loss, grid_lam, grid_loss, ratio, trials, pruned, runs in rows:
        print(f"| {dataset} | {repeat} | {lam:.4g} | {loss:.4f} | {grid_lam:g} | {grid_loss:.4f} | {ratio:.3f} "
              f"| {trials} | {pruned} | {runs:.2f} |")
    good = sum(row[6] <= 1.02 for row in rows)
    print(f"\nratio <= 1.02 in {good} of {len(rows)} cases")
    return 0


def tune_in_a_new_process(dataset: str, seed: int, epochs: int, root: str, *options: str) -> dict:
    """`keras-l2 tune --json` with its defaults on a bundled data set: what a user runs, in its own process."""
    done = subprocess.run([sys.executable, "-m", "keras_l2.cli", "tune", "--dataset", dataset, "--seed", str(seed),
                           "--epochs", str(epochs), "--json", "--tracking-uri", f"sqlite:///{root}/mlflow.db",
                           *options], capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if done.returncode != 0:
        raise SystemExit(f"keras-l2 tune failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def greedy(epochs: int) -> int:
    import keras

    from keras_l2.search.datasets import digits
    from keras_l2.search.models import build_run, compile_run, mlp_function
    from keras_l2.search.tuning import HypergradientLambda

    data = digits()
    print(f"lambda following the one-step hypergradient every epoch (digits, coupled Adam), every 10 of {epochs}:")
    for start in (1e-2, 1e-1, 1.0):
        model = build_run(mlp_function(data.features, data.classes, (512, 512)), 0)
        compile_run(model, start, route="coupled", n=data.n, layers="hidden_.*")
        follow = HypergradientLambda(data, (start / 100, start * 100), hold=0, every=1, samples=1, step=0.15, decay=1.0)
        keras.utils.set_random_seed(1000)
        model.fit(**data.fit_args(32), epochs=epochs, verbose=0, callbacks=[follow])
        print(f"  from {start:g}: " + " ".join(f"{l2:.3g}" for _, l2, _ in follow.trajectory[9::10])
              + f" (then {follow.l2:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
