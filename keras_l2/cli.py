"""`keras-l2`: the command line.

    keras-l2 sweep [--lambdas 0,1e-3,1e-2] [--route regularizer] [--model module:function] ...   a lambda sweep
    keras-l2 tune [--range 1e-4,1e2] [--route regularizer] [--model module:function] ...       the best lambda
    keras-l2 send-pending [--tracking-uri URI]                          deliver records an outage left behind

This module imports no Keras: `check` parses and checks the command line
before `keras_l2_cli` (the installed `keras-l2`) imports the library, so
`--help` and bad options answer at once (Keras imports TensorFlow: seconds).

Example:

>>> from keras_l2.cli import check
>>> check(["sweep", "--lambdas", "0,0.1", "--optimizer", "sgd"]).lambdas
'0,0.1'
"""

from __future__ import annotations

import argparse
import os
import sys

from keras_l2.search import command, tune_command


def parser() -> tuple[argparse.ArgumentParser, dict]:
    """The command line's parser, and its subcommands' ({"sweep": ..., "tune": ...})."""
    p = argparse.ArgumentParser(prog="keras-l2", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    sweep = sub.add_parser("sweep", help="train one model per lambda and compare them in MLflow",
                           description=command.DESCRIPTION)
    command.add_arguments(sweep)
    tune = sub.add_parser("tune", help="find the lambda with the lowest validation data loss, at a few runs' cost",
                          description=tune_command.DESCRIPTION)
    tune_command.add_arguments(tune)
    pending = sub.add_parser("send-pending", help="deliver MLflow records saved during an outage")
    pending.add_argument("--tracking-uri", default=None,
                         help="send the records of this store only (default: of every store with records pending)")
    pending.add_argument("--spool-dir", default=None, help="where they were saved (default: mlruns/keras_l2_pending)")
    pending.add_argument("--timeout", type=float, default=30.0, help="seconds per store (default: %(default)s)")
    return p, {"sweep": sweep, "tune": tune}


def check(argv) -> argparse.Namespace:
    """Parses `argv` and checks the sweep's options; `--help` and bad input exit (status 0 and 2)."""
    p, subcommands = parser()
    args = p.parse_args(argv)
    if args.command == "sweep":
        command.checked_config(args, subcommands["sweep"])
    elif args.command == "tune":
        tune_command.checked_config(args, subcommands["tune"])
    return args


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    p, subcommands = parser()
    args = p.parse_args(argv)
    if args.command == "tune":
        return tune_command.run(args, subcommands["tune"])
    if args.command == "send-pending":
        from keras_l2.tracking.resend import send_pending

        stores = []  # one line per store send_pending went through

        def report(uri, sent, left):
            stores.append(uri)
            print(f"{uri}: {sent} record(s) sent, {left} still pending.")

        left = send_pending(args.tracking_uri, spool_dir=args.spool_dir, timeout=args.timeout, report=report)
        if not stores:
            print("No records are pending.")
        return 0 if left == 0 else 1
    return command.run(args, subcommands["sweep"])


if __name__ == "__main__":
    sys.exit(main())
