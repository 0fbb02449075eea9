"""The tuner's command line, `keras-l2 tune`: the sweep's data, model, route and layer options, and a range.

Example:

>>> from keras_l2.search.tune_command import parser, checked_config
>>> p = parser()
>>> config = checked_config(p.parse_args(["--range", "1e-3,10", "--route", "decoupled"]), p)
>>> config.lambda_range, config.route, config.experiment
((0.001, 10.0), 'decoupled', 'keras_l2-tune')
"""

from __future__ import annotations

import argparse
import os

from keras_l2.search.command import (
    add_shared_arguments,
    add_study_arguments,
    exit_on_error,
    print_result,
    shared_options,
    study_options,
)
from keras_l2.search.config import SHARED_TUNE_TRIALS, TuneConfig, check_tune_config

DESCRIPTION = ("Finds the lambda with the lowest validation data loss in two stages: one run in which lambda "
               "follows the validation hypergradient (held at the middle of --range for the first half of the "
               "epochs), then lambda a quarter decade either side of where it ended, trained from scratch "
               "together to confirm. Prints the best lambda, its test data loss and the cost in plain runs; "
               "every run is an MLflow child run of one parent run. With --study, workers on several machines "
               "share the tune: Optuna's TPE proposes the lambdas instead.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the tuner's options to `p`."""
    defaults = TuneConfig()
    low, high = defaults.lambda_range
    p.add_argument("--range", default=f"{low:g},{high:g}",
                   help="low,high: where lambda is sought, 0 < low < high; the best may be reported beyond it, "
                        "with a note (default: %(default)s)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="initial weights and data order (default: 0)")
    p.add_argument("--log-every-n-steps", type=int, default=None,
                   help="stage 1's run also logs every N steps, its lambda included (default: per epoch only)")
    add_shared_arguments(p, defaults)
    shared = p.add_argument_group("a tune shared by several workers (machines or processes)")
    add_study_arguments(shared, defaults, "Optuna's TPE proposes --trials lambdas in --range on a log scale, its "
                                          "first ones spread over the range, and a median pruner stops poor runs")
    shared.add_argument("--trials", type=int, default=None,
                        help=f"lambdas a shared tune tries, all workers together (default: {SHARED_TUNE_TRIALS})")


def parser(prog: str = "keras-l2 tune") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_arguments(p)
    return p


def config_from_args(args: argparse.Namespace) -> TuneConfig:
    """The `TuneConfig` of parsed options (checked by `check_tune_config`)."""
    parts = [part.strip() for part in str(args.range).split(",")]
    if len(parts) != 2:
        raise ValueError(f"--range: two numbers low,high, e.g. 1e-4,1e2. Received: {args.range!r}")
    return TuneConfig(lambda_range=tuple(parts), seed=args.seed, log_every_n_steps=args.log_every_n_steps,
                      trials=args.trials, **study_options(args), **shared_options(args))


def checked_config(args: argparse.Namespace, p: argparse.ArgumentParser) -> TuneConfig:
    """The options as a checked `TuneConfig`; a bad one exits with status 2 and one line. Needs no Keras."""
    return exit_on_error(p, lambda: check_tune_config(config_from_args(args)))


def run(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    """Checks everything (bad input exits with status 2 and one line, before any run), then tunes."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    config = checked_config(args, p)
    from keras_l2.search import report, tuning

    prepared = exit_on_error(p, lambda: tuning.prepare_tune(config))
    return print_result(args, prepared.run(), report.as_json if config.study else tuning.as_json)


def main(argv=None, prog: str = "keras-l2 tune") -> int:
    """`keras-l2 tune` with `argv` (default: `sys.argv[1:]`)."""
    p = parser(prog)
    return run(p.parse_args(argv), p)
