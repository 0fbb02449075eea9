"""The sweep's command line, `keras-l2 sweep` (also `python experiments/sweep.py`): options to `run_sweep`.

Example:

>>> from keras_l2.search.command import parser, config_from_args
>>> args = parser().parse_args(["--lambdas", "0,0.1", "--model", "my_models:build", "--layers", "dense.*"])
>>> config = config_from_args(args)
>>> config.lambdas, config.model, config.layers
((0.0, 0.1), 'my_models:build', 'dense.*')
"""

from __future__ import annotations

import argparse
import json
import os

from keras_l2._checks import DATASETS, OPTIMIZERS, ROUTES
from keras_l2.search.config import DEFAULT_LEARNING_RATES, RESULTS_DIR, SweepConfig, check_config, parse_lambdas

DESCRIPTION = ("Trains the same network once per lambda (and seed), every run from the same initial weights and "
               "data order, under one MLflow parent run with a child run per lambda; prints a table and the best "
               "lambda (on validation data loss) and writes plots.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the sweep's options to `p`."""
    defaults = SweepConfig()
    p.add_argument("--lambdas", default=",".join(f"{v:g}" for v in defaults.lambdas),
                   help="comma-separated lambdas, each a finite float >= 0 (default: %(default)s)")
    add_shared_arguments(p, defaults)
    p.add_argument("--seeds", type=int, default=defaults.seeds,
                   help="repeat every lambda with this many seeds; with 2 or more the report compares lambdas "
                        "against the seeds' spread (default: %(default)s)")
    p.add_argument("--workers", type=int, default=defaults.workers,
                   help="parallel training processes on this machine (default: %(default)s)")
    p.add_argument("--stacked", action=argparse.BooleanOptionalAction, default=defaults.stacked,
                   help="train every lambda of a seed together in one compiled model, each member exactly as "
                        "its separate run (--no-stacked: one run after another; default: %(default)s)")
    p.add_argument("--stack-size", type=int, default=None,
                   help="members per stack (default: as many as a quarter of the free memory holds)")
    p.add_argument("--results-dir", default=defaults.results_dir,
                   help=f"where the plots go (default: {RESULTS_DIR}/<parent run id>)")
    shared = p.add_argument_group("a sweep shared by several workers (machines or processes)")
    add_study_arguments(shared, defaults, "each (lambda, seed) is trained once, by whichever worker takes it")
    shared.add_argument("--sampler", default=defaults.sampler,
                        help="grid: train every --lambdas value (and seed) once; tpe: Optuna's TPE proposes --trials "
                             "lambdas in --range on a log scale, and a median pruner stops the poor ones early "
                             "(default: %(default)s)")
    shared.add_argument("--trials", type=int, default=None, help="lambdas --sampler tpe tries, all workers together")
    low, high = defaults.lambda_range
    shared.add_argument("--range", default=f"{low:g},{high:g}",
                        help="low,high: where --sampler tpe seeks lambda, 0 < low < high (default: %(default)s)")


def add_study_arguments(group, defaults: SweepConfig, what: str) -> None:
    """`--study`, `--storage` and `--heartbeat`, which `sweep` and `tune` share; `what` says what a study does."""
    group.add_argument("--study", default=None,
                       help=f"the Optuna study's name: every worker runs the same command; {what} (needs --storage)")
    group.add_argument("--storage", default=None,
                       help="the database holding the study: postgresql://user:password@host/db (several "
                            "machines; `keras-l2 team-server` starts one) or sqlite:///path.db (one machine); "
                            "default with --study: KERAS_L2_STORAGE, which keeps the password out of the process "
                            "list")
    group.add_argument("--heartbeat", type=float, default=defaults.heartbeat,
                       help="seconds between a worker's signs of life; a worker silent for three has its runs "
                            "trained again by another (default: %(default)s)")


def add_shared_arguments(p: argparse.ArgumentParser, defaults: SweepConfig) -> None:
    """The options `sweep` and `tune` share: data, model, route, layers, optimizer, training and tracking."""
    p.add_argument("--route", default=defaults.route, help=f"one of {', '.join(ROUTES)} (default: %(default)s)")
    p.add_argument("--optimizer", default=defaults.optimizer,
                   help=f"one of {', '.join(OPTIMIZERS)} (default: %(default)s)")
    p.add_argument("--learning-rate", type=float, default=None,
                   help="step size (default: per optimizer, "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LEARNING_RATES.items()) + ")")
    p.add_argument("--layers", default=defaults.layers,
                   help="Dense layers to regularize: comma-separated names (hidden_1,hidden_2,out) or a regex, "
                        "'' for all (default: %(default)s)")
    p.add_argument("--model", default=None,
                   help="module:function building your own uncompiled keras.Model (no arguments; softmax output), "
                        "imported from the current directory or sys.path; default: the built-in MLP")
    p.add_argument("--hidden", default=",".join(map(str, defaults.hidden)),
                   help="hidden widths of the built-in MLP (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="epochs per run (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per training process (TensorFlow, PyTorch); several workers on one machine "
                        "run faster with cores / workers each (default: the backend's own, all cores)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="(default: %(default)s)")
    p.add_argument("--dataset", default=defaults.dataset,
                   help=f"a bundled data set: {', '.join(DATASETS)} (default: %(default)s)")
    p.add_argument("--train-size", type=int, default=None,
                   help="training examples taken from the bundled data set (default: digits 200, wine 60); the "
                        "rest splits in halves into validation (lambda is chosen there) and test (only reported)")
    p.add_argument("--data", default=None,
                   help="an .npz with x_train, y_train, x_val, y_val and optionally x_test, y_test instead of a "
                        "bundled data set (labels: class ids, strings or one-hot rows)")
    p.add_argument("--allow-unseen-classes", action="store_true",
                   help="accept validation classes that the training split lacks (refused by default)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: MLFLOW_TRACKING_URI, else the embedded mlruns/mlflow.db)")
    p.add_argument("--experiment", default=defaults.experiment, help="MLflow experiment (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress output; the results still print")
    p.add_argument("--json", action="store_true",
                   help="print only the results, as one JSON object on stdout (no progress output)")


def parser(prog: str = "keras-l2 sweep") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_arguments(p)
    return p


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    """The `SweepConfig` of parsed options; raises ValueError for malformed lambdas or widths."""
    return SweepConfig(
        lambdas=parse_lambdas(args.lambdas), seeds=args.seeds, workers=args.workers, stacked=args.stacked,
        stack_size=args.stack_size, results_dir=args.results_dir, sampler=args.sampler, trials=args.trials,
        lambda_range=tuple(part.strip() for part in str(args.range).split(",")), **study_options(args),
        **shared_options(args))


def study_options(args: argparse.Namespace) -> dict:
    """The values of `add_study_arguments`' options, as config fields (the storage from KERAS_L2_STORAGE)."""
    return dict(study=args.study, heartbeat=args.heartbeat,
                storage=args.storage or (os.environ.get("KERAS_L2_STORAGE") if args.study else None))


def shared_options(args: argparse.Namespace) -> dict:
    """The values of `add_shared_arguments`' options, as config fields."""
    return dict(
        route=args.route, optimizer=args.optimizer, learning_rate=args.learning_rate, layers=args.layers,
        hidden=_widths(args.hidden), epochs=args.epochs, batch_size=args.batch_size, train_size=args.train_size,
        threads=args.threads,
        dataset=args.dataset, data=args.data, model=args.model, tracking_uri=args.tracking_uri,
        experiment=args.experiment, allow_unseen_classes=args.allow_unseen_classes,
        verbose=0 if args.quiet or args.json else 1)


def checked_config(args: argparse.Namespace, p: argparse.ArgumentParser) -> SweepConfig:
    """The options as a checked `SweepConfig`; a bad one exits with status 2 and one line. Needs no Keras."""
    return exit_on_error(p, lambda: check_config(config_from_args(args)))


def preflight(config: SweepConfig, p: argparse.ArgumentParser) -> None:
    """The checks that ask a server, made before Keras loads (seconds sooner; the sweep makes them again): a
    tracking server answers and accepts the credentials, a study's database opens. Bad: status 2, one line."""
    from keras_l2.tracking.store import check_reachable, resolve_store

    store = exit_on_error(p, lambda: resolve_store(config.tracking_uri))
    if store.tracking_uri.startswith(("http://", "https://")):  # a local store is created later, not by a check
        exit_on_error(p, lambda: check_reachable(store))
    if getattr(config, "storage", None) and not config.storage.startswith("sqlite"):
        from keras_l2.search.study_storage import open_study_storage

        exit_on_error(p, lambda: open_study_storage(config).engine.dispose())


def exit_on_error(p: argparse.ArgumentParser, make):
    """`make()`, or exit with status 2 and one line naming the bad value (its ValueError's message)."""
    try:
        return make()
    except ValueError as error:
        p.exit(2, f"{p.prog}: error: {error}\n")


def print_result(args: argparse.Namespace, result: dict, as_json) -> int:
    """What `--json` and `--quiet` print at the end (otherwise the progress output has shown the report)."""
    if args.json:
        print(json.dumps(as_json(result)))
    elif args.quiet:
        print(result["report"])
    return 0


def run(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    """Checks everything (bad input exits with status 2 and one line, before any run), then sweeps."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    config = checked_config(args, p)
    from keras_l2.search.report import as_json
    from keras_l2.search.runner import prepare_sweep

    prepared = exit_on_error(p, lambda: prepare_sweep(config))
    return print_result(args, prepared.run(), as_json)


def main(argv=None, prog: str = "keras-l2 sweep") -> int:
    """`keras-l2 sweep` with `argv` (default: `sys.argv[1:]`)."""
    p = parser(prog)
    return run(p.parse_args(argv), p)


def _widths(text: str) -> tuple:
    try:
        widths = tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise ValueError(f"--hidden: {text!r} is not comma-separated integers, e.g. 256,256") from None
    if not widths or min(widths) < 1:
        raise ValueError(f"--hidden: widths must be integers >= 1. Received: {text!r}")
    return widths
