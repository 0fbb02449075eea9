"""`keras-l2`: the command line.

    keras-l2 sweep [--lambdas 0,1e-3,1e-2] [--route regularizer] [--model module:function] ...   a lambda sweep
    keras-l2 send-pending [--tracking-uri URI]                          deliver records an outage left behind
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    from keras_l2.search import command

    parser = argparse.ArgumentParser(prog="keras-l2", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sweep = sub.add_parser("sweep", help="train one model per lambda and compare them in MLflow",
                           description=command.DESCRIPTION)
    command.add_arguments(sweep)
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
    return command.run(args, sweep)


if __name__ == "__main__":
    sys.exit(main())
