"""`keras-l2`: the command line.

    keras-l2 sweep [--lambdas 0,1e-3,1e-2] [--route regularizer] ...   a lambda sweep, tracked in MLflow
    keras-l2 send-pending [--tracking-uri URI]                          deliver records an outage left behind
"""

from __future__ import annotations

import argparse
import os
import sys


def _sweep_parser(sub) -> None:
    from keras_l2 import sweep

    defaults = sweep.SweepConfig()
    p = sub.add_parser(
        "sweep", help="train one model per lambda and compare them in MLflow",
        description="Trains the same network once per lambda (and seed), every run from the same initial "
                    "weights and data order, under one MLflow parent run with a child run per lambda; prints a "
                    "table and the best lambda (on validation data loss) and writes plots.",
    )
    p.add_argument("--lambdas", default=",".join(f"{v:g}" for v in defaults.lambdas),
                   help="comma-separated lambdas, each a finite float >= 0 (default: %(default)s)")
    p.add_argument("--route", default=defaults.route, help=f"one of {', '.join(sweep.ROUTES)} (default: %(default)s)")
    p.add_argument("--optimizer", default=defaults.optimizer,
                   help=f"one of {', '.join(sweep.OPTIMIZERS)} (default: %(default)s)")
    p.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    p.add_argument("--layers", default=defaults.layers,
                   help="Dense layers to regularize: comma-separated names (hidden_1,hidden_2,out) or a regex, "
                        "'' for all (default: %(default)s)")
    p.add_argument("--hidden", default=",".join(map(str, defaults.hidden)), help="hidden widths (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--seeds", type=int, default=defaults.seeds, help="repeat every lambda with this many seeds")
    p.add_argument("--workers", type=int, default=defaults.workers, help="parallel training processes")
    p.add_argument("--train-size", type=int, default=defaults.train_size,
                   help="training examples taken from the digits (default: %(default)s; the rest validates)")
    p.add_argument("--data", default=None, help="an .npz with x_train, y_train, x_val, y_val instead of the digits")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: MLFLOW_TRACKING_URI, else the embedded mlruns/mlflow.db)")
    p.add_argument("--experiment", default=defaults.experiment)
    p.add_argument("--results-dir", default=defaults.results_dir, help="where the plots go (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="keras-l2", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _sweep_parser(sub)
    pending = sub.add_parser("send-pending", help="deliver MLflow records saved during an outage")
    pending.add_argument("--tracking-uri", default=None)
    pending.add_argument("--spool-dir", default=None)
    pending.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.command == "send-pending":
        from keras_l2.tracking.outbox import send_pending

        left = send_pending(args.tracking_uri, spool_dir=args.spool_dir, timeout=args.timeout)
        print(f"{left} record(s) still pending.")
        return 0 if left == 0 else 1
    from keras_l2 import sweep

    try:
        config = sweep.SweepConfig(
            lambdas=sweep.parse_lambdas(args.lambdas), route=args.route, optimizer=args.optimizer,
            learning_rate=args.learning_rate, layers=args.layers, hidden=_widths(args.hidden), epochs=args.epochs,
            batch_size=args.batch_size, seeds=args.seeds, workers=args.workers, train_size=args.train_size,
            data=args.data, tracking_uri=args.tracking_uri, experiment=args.experiment,
            results_dir=args.results_dir, verbose=0 if args.quiet else 1,
        )
        sweep.check_config(config)
        if config.data:
            sweep.load_npz(config.data)  # refuse bad data before any run is created
        from keras_l2.tracking.store import resolve_store

        resolve_store(config.tracking_uri)
    except ValueError as error:
        parser.exit(2, f"keras-l2 sweep: error: {error}\n")
    sweep.run_sweep(config)
    return 0


def _widths(text: str) -> tuple:
    try:
        widths = tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise ValueError(f"--hidden: {text!r} is not comma-separated integers, e.g. 256,256") from None
    if not widths or min(widths) < 1:
        raise ValueError(f"--hidden: widths must be integers >= 1. Received: {text!r}")
    return widths


if __name__ == "__main__":
    sys.exit(main())
