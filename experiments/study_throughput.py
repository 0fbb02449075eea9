"""A shared sweep's throughput: 2 workers (with and without --threads) against 1 on the same 12-run grid.

It starts a team server (`keras-l2 team-server`'s PostgreSQL and MLflow with
basic auth) in a temporary folder, then per round runs the same sweep
(`keras-l2 sweep --study ... --storage ...`, 6 lambdas x 2 seeds, one run
at a time per worker) as a new study with 1 worker and with 2 worker
processes started together, in alternating order, and times each from the
start of the first worker to the end of the last (Python and TensorFlow's
start included: it is part of what a user waits for). Three variants per
round (of five), in rotating order: 1 worker with the backend's own threads (all
cores), 2 workers with theirs, and 2 workers with `--threads` cores / 2
each (what the README suggests for several workers on one machine).

Two more variants measure the same ratio for the training alone: the same 12
runs (model built as a run's, data split, Adam, batch 32, epochs, validation
every epoch, the test loss) as bare `fit` calls, with no L2 route, no
MLflow and no Optuna, by 1 process and by 2 processes of 6 with one thread
each. Two processes sharing 2 cores do not each train as fast as one alone
(they share caches and memory bandwidth), so this is the ratio the sweep's
training part can reach here; the sweep's Python, tracking and coordination
work may split better. The table gives per variant the median time and the
median of its per-round ratios to its 1-process variant. Five variants:
use 5 rounds (the default) so that each takes each place in the order once.

Usage: `python experiments/study_throughput.py [--rounds 5] [--epochs 20]`
(PostgreSQL must be installed: `make postgresql`).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from keras_l2.search.team_server import start_team_server

GRID = ("--lambdas", "0,0.01,0.03,0.1,0.3,1", "--seeds", "2")


def sweep(team, study: str, workers: int, epochs: int, logs: Path, options: list) -> tuple:
    """(wall seconds, the workers' CPU seconds) for `workers` processes to finish study `study` together."""
    command = [sys.executable, "-m", "keras_l2.cli", "sweep", "--study", study,  # --storage: KERAS_L2_STORAGE
               "--tracking-uri", team.tracking_uri, "--experiment", study, *GRID, "--epochs", str(epochs),
               "--quiet", "--results-dir", str(logs / study), *options]
    env = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": team.password,
           "KERAS_L2_STORAGE": team.storage}
    return together(command, env, [logs / f"{study}-{i}.log" for i in range(workers)])


def plain(name: str, workers: int, epochs: int, threads: int | None, logs: Path) -> tuple:
    """(wall seconds, CPU seconds) for `workers` processes to train the 12 runs as bare `fit` calls."""
    command = [sys.executable, __file__, "--plain-runs", str(12 // workers), "--epochs", str(epochs),
               *(["--threads", str(threads)] if threads else [])]
    return together(command, {}, [logs / f"{name}-{i}.log" for i in range(workers)])


def together(command: list, env: dict, logs: list) -> tuple:
    """(wall seconds, their CPU seconds) for one process of `command` per log file, started together."""
    cpu = _children_cpu()
    started = time.perf_counter()
    outputs = [open(log, "w") for log in logs]  # noqa: SIM115 - closed below
    processes = [subprocess.Popen(command, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env}, stdout=out,
                                  stderr=subprocess.STDOUT) for out in outputs]
    codes = [p.wait() for p in processes]
    seconds = time.perf_counter() - started
    for out in outputs:
        out.close()
    if any(codes):
        raise RuntimeError(f"a process failed (exit codes {codes}); see {', '.join(map(str, logs))}")
    return seconds, _children_cpu() - cpu


def train_plain(runs: int, epochs: int, threads: int | None) -> None:
    """In this process: `runs` of the sweep's default runs as bare `fit` calls (a worker's training, no more)."""
    import keras

    from keras_l2.backend.host import limit_threads
    from keras_l2.search.datasets import digits
    from keras_l2.search.models import build_run, mlp_function
    from keras_l2.search.training import test_data_loss

    if threads:
        limit_threads(threads)  # what a worker's --threads does
    data = digits()
    build = mlp_function(data.x_train.shape[1], data.y_train.shape[1], (512, 512))
    for run in range(runs):
        model = build_run(build, seed=run % 2)
        model.compile(optimizer=keras.optimizers.Adam(), loss="categorical_crossentropy", metrics=["accuracy"])
        model.fit(**data.fit_args(32), epochs=epochs, verbose=0)
        test_data_loss(model, data)


def variants() -> dict:
    """{name: (what it times, the variant its ratio is to)}: 1 worker, 2 workers, 2 workers sharing the cores with
    --threads; bare `fit` calls, 1 process and 2 with a core's share of threads each."""
    share = max(1, len(os.sched_getaffinity(0)) // 2)

    def shared(workers, options):
        return lambda team, study, epochs, root: sweep(team, study, workers, epochs, root, options)

    return {"1 worker": (shared(1, []), "1 worker"), "2 workers": (shared(2, []), "1 worker"),
            f"2 workers, --threads {share}": (shared(2, ["--threads", str(share)]), "1 worker"),
            "plain fit, 1 process": (lambda team, study, epochs, root: plain(study, 1, epochs, None, root),
                                     "plain fit, 1 process"),
            f"plain fit, 2 x {share} thread": (lambda team, study, epochs, root: plain(study, 2, epochs, share, root),
                                               "plain fit, 1 process")}


def _children_cpu() -> float:
    """CPU seconds of this process' ended children (the workers, once waited; the server once stopped)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20, help="epochs per run of the default digits MLP")
    parser.add_argument("--plain-runs", type=int, help=argparse.SUPPRESS)  # a process of the plain fit variants
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("rounds", "epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: must be an integer >= 1. Received: {getattr(args, name)}")
    if args.plain_runs:
        train_plain(args.plain_runs, args.epochs, args.threads)
        return 0
    root = Path(tempfile.mkdtemp(prefix="keras_l2_throughput_"))
    os.chmod(root, 0o755)  # as root, PostgreSQL runs as its own user, who must enter the folder
    team = start_team_server(root / "team", port=0)
    kinds = variants()
    times, cpus = {name: [] for name in kinds}, {name: [] for name in kinds}
    try:
        for r in range(args.rounds):
            names = list(kinds)
            for name in names[r % len(names):] + names[:r % len(names)]:
                seconds, cpu = kinds[name][0](team, f"round{r}-v{names.index(name)}", args.epochs, root)
                times[name].append(seconds)
                cpus[name].append(cpu)
                print(f"round {r + 1}: {name:<28} {seconds:6.1f} s, workers' CPU {cpu:6.1f} s", flush=True)
    finally:
        before = _children_cpu()
        team.stop()  # the MLflow server's CPU is counted once it has ended (PostgreSQL runs as a daemon: not)
        server = _children_cpu() - before
    print(f"\n12 runs (6 lambdas x 2 seeds), digits MLP 64-512-512-10, {args.epochs} epochs, "
          f"{args.rounds} interleaved rounds, {len(os.sched_getaffinity(0))} CPUs")
    print(f"{'variant':<28} {'median s':>9} {'ratio to 1 process':>19} {'workers CPU s':>14}  per-round ratios")
    for name, (_, baseline) in kinds.items():
        ratios = [mine / one for one, mine in zip(times[baseline], times[name], strict=True)]
        print(f"{name:<28} {statistics.median(times[name]):>9.1f} {statistics.median(ratios):>19.3f} "
              f"{statistics.median(cpus[name]):>14.1f}  {', '.join(f'{x:.3f}' for x in ratios)}")
    runs = sum(not name.startswith("plain") for name in kinds) * args.rounds * 12  # the shared sweeps' runs
    print(f"MLflow server CPU: {server:.1f} s over {runs} runs ({server / runs:.2f} s a run)")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
