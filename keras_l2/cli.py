"""`keras-l2`: the command line.

    keras-l2 sweep [--lambdas 0,1e-3,1e-2] [--route regularizer] [--model module:function] ...   a lambda sweep
    keras-l2 tune [--range 1e-4,1e2] [--route regularizer] [--model module:function] ...       the best lambda
    keras-l2 tune --study NAME --storage URL [--trials 8] ...          the best lambda, TPE across workers
    keras-l2 send-pending [--tracking-uri URI]                          deliver records an outage left behind
    keras-l2 team-server [--dir mlruns/team] [--host 127.0.0.1]        PostgreSQL and MLflow with auth, for --study
    keras-l2 report --study NAME --storage URL                         a shared sweep's table and plots, so far

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
    team = sub.add_parser("team-server", help="start PostgreSQL and an MLflow server with basic auth (for --study)",
                          description="Starts PostgreSQL (a database for Optuna's studies and one for MLflow) and "
                                      "`mlflow server --app-name basic-auth` on it, generates the passwords into an "
                                      "owner-only file, prints the workers' command, and runs until Ctrl-C.")
    team.add_argument("--dir", default="mlruns/team",
                      help="where the databases, artifacts and credentials live (default: %(default)s)")
    team.add_argument("--host", default="127.0.0.1",
                      help="the MLflow server's address (default: %(default)s, this machine only; 0.0.0.0: all)")
    team.add_argument("--port", type=int, default=5000, help="the MLflow server's port (default: %(default)s)")
    team.add_argument("--database-host", default="127.0.0.1",
                      help="PostgreSQL's address (default: %(default)s; workers on other machines need one they "
                           "reach, e.g. 0.0.0.0, and connect with the generated password)")
    team.add_argument("--database-port", type=int, default=5433,
                      help="PostgreSQL's port (default: %(default)s, beside a system PostgreSQL's 5432)")
    team.add_argument("--study", default="my-sweep", help="the study named in the printed command")
    report = sub.add_parser("report", help="the table, best lambda and plots of a shared sweep (--study), so far",
                            description="Reads a study's finished runs (from the study alone: no MLflow needed, "
                                        "workers may still be training) and prints the table and the best lambda, "
                                        "and draws the plots.")
    report.add_argument("--study", required=True, help="the study's name")
    report.add_argument("--storage", default=os.environ.get("KERAS_L2_STORAGE"),
                        help="the database holding it, as the workers' (default: KERAS_L2_STORAGE)")
    report.add_argument("--results-dir", default=None, help="where the plots go (default: mlruns/plots/<parent>)")
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
        command.preflight(command.checked_config(args, subcommands["sweep"]), subcommands["sweep"])
    elif args.command == "tune":
        command.preflight(tune_command.checked_config(args, subcommands["tune"]), subcommands["tune"])
    return args


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    p, subcommands = parser()
    args = p.parse_args(argv)
    if args.command == "tune":
        return tune_command.run(args, subcommands["tune"])
    if args.command == "team-server":
        return _team_server(args)
    if args.command == "report":
        from keras_l2.search.study_report import report_study

        if not args.storage:
            p.exit(2, "keras-l2 report: error: --storage: give the study's database (or set KERAS_L2_STORAGE)\n")
        try:
            print(report_study(args.study, args.storage, args.results_dir)["report"])
        except ValueError as error:
            p.exit(2, f"keras-l2 report: error: {error}\n")
        return 0
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


def _team_server(args: argparse.Namespace) -> int:
    import signal
    import threading

    from keras_l2.search.team_server import start_team_server

    team = start_team_server(args.dir, host=args.host, port=args.port, database_host=args.database_host,
                             database_port=args.database_port)
    print(team.instructions(args.study), flush=True)
    print("Running; Ctrl-C stops both servers.", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        team.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
