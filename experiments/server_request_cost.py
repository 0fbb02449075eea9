"""What one `log_batch` costs the team server: the CPU behind the outbox's pacing to a server.

Starts `keras-l2 team-server`'s PostgreSQL and MLflow server with basic auth
in a temporary folder, sends `--requests` `log_batch` calls of 12 metrics (a
digits epoch's `keras_l2` metrics) and of 120 to one run through MLflow's
own client, and prints per request the machine's CPU outside this process
(the server, its workers and PostgreSQL: read from /proc/stat, so run it on
an otherwise idle machine) and the wall time. A fixed cost per request and a
cost per metric follow from the two sizes.

Usage: `python experiments/server_request_cost.py [--requests 100]` (Linux;
PostgreSQL must be installed: `make postgresql`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from keras_l2.search.team_server import start_team_server

SIZES = (12, 120)


def others_cpu() -> float:
    """CPU seconds the whole machine spent outside this process (Linux /proc/stat, all CPUs)."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    busy = sum(fields[i] for i in (0, 1, 2, 5, 6))  # user, nice, system, irq, softirq (steal: other VMs' time)
    mine = os.times()
    return busy / os.sysconf("SC_CLK_TCK") - mine.user - mine.system


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100, help="log_batch calls per size")
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error(f"--requests: must be an integer >= 1. Received: {args.requests}")
    root = Path(tempfile.mkdtemp(prefix="keras_l2_request_cost_"))
    os.chmod(root, 0o755)  # as root, PostgreSQL runs as its own user, who must enter the folder
    team = start_team_server(root / "team", port=0)
    try:
        os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=team.password)
        import mlflow
        from mlflow.entities import Metric

        client = mlflow.MlflowClient(team.tracking_uri)
        run = client.create_run(client.create_experiment("request-cost")).info.run_id
        costs = {}
        for size in SIZES:
            client.log_batch(run, metrics=[Metric(f"m{k}", 0.5, 0, 0) for k in range(size)])  # the keys' first rows
            cpu, started = others_cpu(), time.perf_counter()
            for step in range(1, args.requests + 1):
                client.log_batch(run, metrics=[Metric(f"m{k}", 0.5, int(time.time() * 1000), step)
                                               for k in range(size)])
            costs[size] = ((others_cpu() - cpu) / args.requests, (time.perf_counter() - started) / args.requests)
    finally:
        team.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"{'metrics per log_batch':>22} {'server + PostgreSQL CPU ms':>27} {'wall ms':>8}")
    for size, (cpu, wall) in costs.items():
        print(f"{size:>22} {1000 * cpu:>27.1f} {1000 * wall:>8.1f}")
    (small, (cpu_small, _)), (large, (cpu_large, _)) = costs.items()
    per_metric = (cpu_large - cpu_small) / (large - small)
    print(f"per request {1000 * (cpu_small - small * per_metric):.1f} ms + per metric {1000 * per_metric:.2f} ms "
          f"of CPU ({args.requests} requests per size, {len(os.sched_getaffinity(0))} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
